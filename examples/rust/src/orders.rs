//! Order fulfilment, the workflow of `demo` and `order_events`:
//!
//! ```text
//! order.fulfil (decision)   reserve inventory (checkpoint), then choose the
//!   │                        parallel steps this order needs
//!   ├── charge.payment   ┐
//!   ├── pack.items       ├─ run in parallel
//!   └── notify.customer  ┘  (only if the customer asked for updates)
//!         │
//! order.ship (convergence)  their results (ctx.dependency_results), then
//!                           await payment.confirmed:<order>, ship (checkpoint),
//!                           await shipment.delivered:<order>; its result is
//!                           the task's result
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchyard::{Decision, HandlerOptions, NewStep, StepError, WorkerBuilder};
use tokio::sync::watch;

use crate::timeline::{self, compact, say};

/// The handler that starts the workflow.
pub const ROOT: &str = "order.fulfil";

/// An order, as spawned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Order {
    /// Order id; it names the events (`payment.confirmed:<order>`).
    pub order: String,
    /// Who ordered.
    pub customer: Customer,
    /// What was ordered.
    pub items: Vec<Item>,
    /// ISO currency code.
    pub currency: String,
}

/// A customer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Customer {
    /// Name.
    pub name: String,
    /// Where updates go; no address, no `notify.customer` step.
    #[serde(default)]
    pub email: Option<String>,
}

/// An order line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    /// Stock keeping unit.
    pub sku: String,
    /// How many.
    pub qty: u32,
    /// Unit price.
    pub price: f64,
}

impl Order {
    /// What the customer pays.
    pub fn total(&self) -> f64 {
        self.items.iter().map(|i| i.price * f64::from(i.qty)).sum()
    }
    /// Units to pick.
    pub fn units(&self) -> u32 {
        self.items.iter().map(|i| i.qty).sum()
    }
}

/// The order both scenarios spawn.
pub fn sample_order(order: &str) -> Order {
    Order {
        order: order.to_string(),
        customer: Customer {
            name: "Ada Lovelace".into(),
            email: Some("ada@example.com".into()),
        },
        items: vec![
            Item {
                sku: "LAMP-01".into(),
                qty: 1,
                price: 49.0,
            },
            Item {
                sku: "BULB-E27".into(),
                qty: 4,
                price: 3.5,
            },
        ],
        currency: "EUR".into(),
    }
}

/// The event the payment provider sends once the charge has settled.
pub fn payment_event(order: &str) -> String {
    format!("payment.confirmed:{order}")
}

/// The event the courier sends on delivery.
pub fn delivery_event(order: &str) -> String {
    format!("shipment.delivered:{order}")
}

/// A payload the payment provider could send.
pub fn payment_payload(order: &Order) -> Value {
    json!({"amount": order.total(), "currency": order.currency, "method": "card"})
}

/// A payload the courier could send.
pub fn delivery_payload(order: &Order) -> Value {
    json!({"signed_by": order.customer.name, "at": "front door"})
}

/// How the workflow behaves in one scenario.
#[derive(Debug, Clone, Default)]
pub struct OrderFlow {
    /// How long `order.ship` waits for each event before the task fails
    /// (`None`: forever).
    pub await_timeout: Option<Duration>,
    /// When set, `pack.items` finishes only once this turns true. The demo
    /// uses it to hold the workflow back until the payment event has been
    /// emitted, so that the cached-event path shows on every run, however
    /// loaded the machine is.
    pub pack_gate: Option<watch::Receiver<bool>>,
    /// Handlers another process serves, not registered in this host: the
    /// demo's Python (`notify.customer`), Node (`charge.payment`) and Ruby
    /// (`invoice.issue`) workers.
    pub elsewhere: Vec<String>,
    /// Add an `invoice.issue` step to the parallel ones.
    pub invoice: bool,
}

impl OrderFlow {
    fn here(&self, handler: &str) -> bool {
        !self.elsewhere.iter().any(|h| h == handler)
    }
}

/// Registers the workflow's handlers.
pub fn register(builder: WorkerBuilder, flow: OrderFlow) -> WorkerBuilder {
    let opts = HandlerOptions::default;
    let gate = flow.pack_gate.clone();
    let timeout = flow.await_timeout;
    let invoice = flow.invoice;
    let builder = builder.decision(ROOT, opts(), move |input, ctx| async move {
        // A malformed order fails here, once, as invalid input (no retries).
        let order: Order = serde_json::from_value(input)?;
        if order.items.is_empty() {
            return Err(StepError::invalid_input("the order has no items"));
        }
        let reservation: Value = ctx
            .checkpoint("reserve-inventory", || async {
                say(
                    ctx.step_name(),
                    format!(
                        "reserving {} units for order {}",
                        order.units(),
                        order.order
                    ),
                );
                work(Duration::from_millis(200)).await;
                let r =
                    json!({"reservation": format!("RES-{}", order.order), "units": order.units()});
                say(
                    ctx.step_name(),
                    format!("checkpoint reserve-inventory stored {}", compact(&r)),
                );
                Ok(r)
            })
            .await?;

        let mut steps = Vec::new();
        let mut step = |name: &str, input: Value| {
            steps.push(NewStep {
                name: name.into(),
                handler: name.into(),
                input,
                depends_on: vec![],
                routes: Default::default(),
            });
        };
        if order.total() > 0.0 {
            step(
                "charge.payment",
                json!({"order": order.order, "amount": order.total(), "currency": order.currency}),
            );
        }
        step(
            "pack.items",
            json!({"order": order.order, "items": order.items, "reservation": reservation}),
        );
        if let Some(email) = &order.customer.email {
            step(
                "notify.customer",
                json!({"order": order.order, "email": email}),
            );
        }
        if invoice {
            step(
                "invoice.issue",
                json!({"order": order.order, "amount": order.total(), "currency": order.currency}),
            );
        }
        let parallel: Vec<String> = steps.iter().map(|s| s.name.clone()).collect();
        say(
            ctx.step_name(),
            format!(
                "decision: run {} in parallel, then order.ship",
                parallel.join(", ")
            ),
        );
        steps.push(NewStep {
            name: "order.ship".into(),
            handler: "order.ship".into(),
            input: json!({"order": order, "reservation": reservation}),
            depends_on: parallel,
            routes: Default::default(),
        });
        // The last step (order.ship) carries the task's result.
        Ok(Decision::steps(steps))
    });
    let builder = if !flow.here("charge.payment") {
        builder
    } else {
        builder.step("charge.payment", opts(), |input, ctx| async move {
            ctx.checkpoint("authorise", || async {
                say(ctx.step_name(), format!("authorising {} {}", input["amount"], str_of(&input["currency"])));
                work(Duration::from_millis(150)).await;
                let auth = json!({"authorisation": format!("AUTH-{}", str_of(&input["order"])), "amount": input["amount"]});
                say(ctx.step_name(), format!("authorised; the provider confirms later with {}", payment_event(str_of(&input["order"]))));
                Ok(auth)
            })
            .await
        })
    };
    let builder = builder.step("pack.items", opts(), move |input, ctx| {
        let gate = gate.clone();
        async move {
            ctx.checkpoint("pack", || async {
                say(
                    ctx.step_name(),
                    format!("packing order {}", str_of(&input["order"])),
                );
                work(Duration::from_millis(300)).await;
                if let Some(mut gate) = gate {
                    // A closed channel means the demo gave up; pack anyway.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(30), gate.wait_for(|open| *open))
                            .await;
                }
                let parcel =
                    json!({"parcel": format!("PCL-{}", str_of(&input["order"])), "weight_kg": 1.4});
                say(ctx.step_name(), format!("packed {}", compact(&parcel)));
                Ok(parcel)
            })
            .await
        }
    });
    let builder = if flow.invoice && flow.here("invoice.issue") {
        builder.step("invoice.issue", opts(), |input, ctx| async move {
            ctx.checkpoint("invoice", || async {
                say(ctx.step_name(), format!("issued INV-{} for {}", str_of(&input["order"]), input["amount"]));
                Ok(json!({"invoice": format!("INV-{}", str_of(&input["order"])), "amount": input["amount"]}))
            })
            .await
        })
    } else {
        builder
    };
    let builder = if flow.here("notify.customer") {
        builder.step("notify.customer", opts(), |input, ctx| async move {
            ctx.checkpoint("email", || async {
                work(Duration::from_millis(100)).await;
                say(
                    ctx.step_name(),
                    format!("emailed {}: order received", str_of(&input["email"])),
                );
                Ok(json!({"sent_to": input["email"], "template": "order-received"}))
            })
            .await
        })
    } else {
        builder
    };
    builder.step("order.ship", opts(), move |input, ctx| async move {
        let order: Order = serde_json::from_value(input["order"].clone())?;
        let done = ctx.dependency_results().await?;
        if timeline::once(format!("{}/converged", ctx.task_id())) {
            let names: Vec<&str> = done.keys().map(String::as_str).collect();
            say(
                ctx.step_name(),
                format!("converged on {}", names.join(", ")),
            );
        }

        let payment = timeline::await_event(&ctx, &payment_event(&order.order), timeout).await?;
        let shipment: Value = ctx
            .checkpoint("ship", || async {
                say(ctx.step_name(), "handing the parcel to the courier");
                work(Duration::from_millis(200)).await;
                let s = json!({"carrier": "ACME Post", "tracking": format!("TRK-{}", order.order)});
                say(
                    ctx.step_name(),
                    format!("checkpoint ship stored {}", compact(&s)),
                );
                Ok(s)
            })
            .await?;
        let delivery = timeline::await_event(&ctx, &delivery_event(&order.order), timeout).await?;

        if timeline::once(format!("{}/delivered", ctx.task_id())) {
            say(
                ctx.step_name(),
                "delivered: the task completes with this step's result",
            );
        }
        Ok(json!({
            "order": order.order,
            "status": "delivered",
            "total": order.total(),
            "currency": order.currency,
            "reservation": input["reservation"],
            "payment": {"authorisation": done.get("charge.payment"), "confirmation": payment},
            "parcel": done.get("pack.items"),
            "notified": done.get("notify.customer"),
            "invoice": done.get("invoice.issue"),
            "shipment": shipment,
            "delivery": delivery,
        }))
    })
}

/// Simulated work (a call to some service).
async fn work(d: Duration) {
    tokio::time::sleep(d).await;
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// Waits until some step of task `id` is suspended awaiting `event` (true)
/// or the task has finished (false), giving up after `within`.
///
/// Another process may hold the step, so this reads the store rather than
/// in-process signals; a short poll is plenty for a demo.
pub async fn suspended_on(
    client: &switchyard::Client,
    id: switchyard::TaskId,
    event: &str,
    within: Duration,
) -> anyhow::Result<bool> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let detail = client.inspect(id).await?;
        if detail.task.state.is_terminal() {
            return Ok(false);
        }
        let waiting = detail.steps.iter().any(|s| {
            s.state == switchyard::StepState::Suspended
                && s.wait.as_ref().and_then(|w| w.event.as_deref()) == Some(event)
        });
        if waiting {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "task {id} did not start waiting for {event} within {} s",
                within.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
