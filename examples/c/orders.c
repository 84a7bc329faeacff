/* Order fulfilment, the reference scenario, with every handler in C:
 *
 *   order.fulfil (decision)  reserve inventory (checkpoint), then choose the
 *     |                      steps this order needs
 *     +-- charge.payment   \   in parallel; the charge completes
 *     +-- pack.items        >  asynchronously from the "payment provider"
 *     +-- notify.customer  /   thread (sy_ctx_defer + sy_completion)
 *     |
 *   order.ship (convergence) reads their results, awaits
 *                            payment.confirmed:<order>, ships (checkpoint),
 *                            awaits shipment.delivered:<order>
 *
 * The payment confirmation is emitted before the workflow awaits it (the
 * store keeps it); the delivery confirmation after the task has suspended
 * on it (the step is parked and woken by the event).
 *
 *   orders [STORE_URL]      (default: a fresh SQLite file in /tmp)
 *
 * Prints a timeline and the task's result; exits 0 when the order was
 * delivered. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "switchyard.h"

static struct timespec t0;

static void say(const char *who, const char *fmt, ...) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long ms = (now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000;
    va_list ap;
    va_start(ap, fmt);
    printf("%6ld ms  %-16s ", ms, who);
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Copies the JSON string value of `"key":"..."` into out ("" if absent). */
static const char *str_field(const char *json, const char *key, char *out, size_t n) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":\"", key);
    const char *p = strstr(json, pat);
    out[0] = 0;
    if (!p) return out;
    p += strlen(pat);
    size_t i = 0;
    while (*p && *p != '"' && i + 1 < n) out[i++] = *p++;
    out[i] = 0;
    return out;
}

static double num_field(const char *json, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(json, pat);
    return p ? strtod(p + strlen(pat), NULL) : 0.0;
}

static int32_t output(sy_ctx *ctx, const char *json) {
    sy_ctx_set_output(ctx, json, strlen(json), NULL);
    return SY_OK;
}

/* Fails the step with the error of a context call, passing its status on. */
static int32_t pass_on(sy_ctx *ctx, sy_status st, sy_error *err) {
    const char *m = sy_error_message(err);
    sy_ctx_set_output(ctx, m, strlen(m), NULL);
    sy_error_free(err);
    return st;
}

/* Looks up checkpoint `name`; if absent, stores `value` (what the work
 * produced). Either way `out` holds the checkpointed JSON. */
static sy_status checkpoint(sy_ctx *ctx, const char *name, const char *value, int *ran,
                            char *out, size_t n, sy_error **err) {
    sy_buf v = {0};
    bool found = false;
    sy_status st = sy_ctx_checkpoint_get(ctx, name, &v, &found, err);
    if (st != SY_OK) return st;
    *ran = !found;
    if (found) {
        snprintf(out, n, "%s", (const char *)v.ptr);
        sy_buf_free(&v);
        return SY_OK;
    }
    snprintf(out, n, "%s", value);
    return sy_ctx_checkpoint_put(ctx, name, value, err);
}

static int32_t fulfil(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    char order[64], email[128], res[256], value[256];
    sy_error *err = NULL;
    str_field(input, "order", order, sizeof order);
    str_field(input, "email", email, sizeof email);
    double total = num_field(input, "total");
    if (!order[0]) {
        sy_ctx_fail(ctx, SY_INVALID_ARGUMENT, "the order has no `order` id", -1, NULL);
        return SY_ERROR_PERMANENT;
    }
    int ran = 0;
    snprintf(value, sizeof value, "{\"reservation\":\"RES-%s\"}", order);
    sy_status st = checkpoint(ctx, "reserve-inventory", value, &ran, res, sizeof res, &err);
    if (st != SY_OK) return pass_on(ctx, st, err);
    say(sy_ctx_step_name(ctx), ran ? "reserved inventory, checkpoint %s" : "inventory already reserved: %s", res);

    char d[2048];
    int n = snprintf(d, sizeof d, "{\"steps\":[");
    char deps[256] = "";
    if (total > 0) {
        n += snprintf(d + n, sizeof d - n,
                      "{\"name\":\"charge.payment\",\"handler\":\"charge.payment\","
                      "\"input\":{\"order\":\"%s\",\"amount\":%.2f}},", order, total);
        strcat(deps, "\"charge.payment\",");
    }
    n += snprintf(d + n, sizeof d - n,
                  "{\"name\":\"pack.items\",\"handler\":\"pack.items\","
                  "\"input\":{\"order\":\"%s\",\"reservation\":%s}},", order, res);
    strcat(deps, "\"pack.items\"");
    if (email[0]) {
        n += snprintf(d + n, sizeof d - n,
                      "{\"name\":\"notify.customer\",\"handler\":\"notify.customer\","
                      "\"input\":{\"order\":\"%s\",\"email\":\"%s\"}},", order, email);
        strcat(deps, ",\"notify.customer\"");
    }
    n += snprintf(d + n, sizeof d - n,
                  "{\"name\":\"order.ship\",\"handler\":\"order.ship\",\"input\":{\"order\":\"%s\"},"
                  "\"depends_on\":[%s]}]}", order, deps);
    say(sy_ctx_step_name(ctx), "decision: [%s] in parallel, then order.ship", deps);
    return output(ctx, d);
}

/* The payment provider: answers charges from its own thread. */
struct charge {
    sy_completion *completion;
    char order[64];
    double amount;
};

static void *provider(void *arg) {
    struct charge *c = arg;
    sleep_ms(150);
    char out[256];
    int n = snprintf(out, sizeof out, "{\"authorisation\":\"AUTH-%s\",\"amount\":%.2f}", c->order, c->amount);
    say("provider", "authorised %.2f for order %s (completing the deferred step)", c->amount, c->order);
    sy_error *err = NULL;
    if (sy_completion_complete(c->completion, SY_OK, out, (size_t)n, &err) != SY_OK)
        say("provider", "completion refused: %s", sy_error_message(err));
    sy_error_free(err);
    free(c);
    return NULL;
}

static int32_t charge(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    struct charge *c = calloc(1, sizeof *c);
    sy_error *err = NULL;
    sy_status st = sy_ctx_defer(ctx, &c->completion, &err);
    if (st != SY_OK) {
        free(c);
        return pass_on(ctx, st, err);
    }
    str_field(input, "order", c->order, sizeof c->order);
    c->amount = num_field(input, "amount");
    say(sy_ctx_step_name(ctx), "asking the provider to charge %.2f; the thread is free meanwhile", c->amount);
    pthread_t t;
    pthread_create(&t, NULL, provider, c);
    pthread_detach(t);
    return SY_PENDING;
}

static int32_t pack(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    char order[64], v[128], out[256];
    sy_error *err = NULL;
    str_field(input, "order", order, sizeof order);
    snprintf(v, sizeof v, "{\"parcel\":\"PCL-%s\",\"weight_kg\":1.4}", order);
    int ran = 0;
    sleep_ms(100); /* packing */
    sy_status st = checkpoint(ctx, "pack", v, &ran, out, sizeof out, &err);
    if (st != SY_OK) return pass_on(ctx, st, err);
    say(sy_ctx_step_name(ctx), "packed %s", out);
    return output(ctx, out);
}

static int32_t notify(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    char email[128], v[256], out[256];
    sy_error *err = NULL;
    str_field(input, "email", email, sizeof email);
    snprintf(v, sizeof v, "{\"sent_to\":\"%s\",\"template\":\"order-received\"}", email);
    int ran = 0;
    sy_status st = checkpoint(ctx, "email", v, &ran, out, sizeof out, &err);
    if (st != SY_OK) return pass_on(ctx, st, err);
    if (ran) say(sy_ctx_step_name(ctx), "emailed %s: order received", email);
    return output(ctx, out);
}

static int32_t ship(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    char order[64], name[128], v[256], shipment[256];
    sy_error *err = NULL;
    sy_buf deps = {0}, payment = {0}, delivery = {0};
    str_field(input, "order", order, sizeof order);

    sy_status st = sy_ctx_dependency_results(ctx, &deps, &err);
    if (st != SY_OK) return pass_on(ctx, st, err);

    snprintf(name, sizeof name, "payment.confirmed:%s", order);
    st = sy_ctx_await_event(ctx, name, 60000, &payment, &err);
    if (st != SY_OK) {
        sy_buf_free(&deps);
        if (st == SY_SUSPENDED) say(sy_ctx_step_name(ctx), "suspended on %s", name);
        return pass_on(ctx, st, err);
    }
    int ran = 0;
    snprintf(v, sizeof v, "{\"carrier\":\"ACME Post\",\"tracking\":\"TRK-%s\"}", order);
    st = checkpoint(ctx, "ship", v, &ran, shipment, sizeof shipment, &err);
    if (st != SY_OK) {
        sy_buf_free(&deps), sy_buf_free(&payment);
        return pass_on(ctx, st, err);
    }
    if (ran) say(sy_ctx_step_name(ctx), "payment confirmed %s; handed the parcel to the courier", (const char *)payment.ptr);

    snprintf(name, sizeof name, "shipment.delivered:%s", order);
    st = sy_ctx_await_event(ctx, name, 60000, &delivery, &err);
    if (st != SY_OK) {
        sy_buf_free(&deps), sy_buf_free(&payment);
        if (st == SY_SUSPENDED) say(sy_ctx_step_name(ctx), "suspended on %s (nothing runs meanwhile)", name);
        return pass_on(ctx, st, err);
    }
    say(sy_ctx_step_name(ctx), "delivered: %s", (const char *)delivery.ptr);
    size_t n = deps.len + payment.len + delivery.len + strlen(shipment) + 128;
    char *out = malloc(n);
    snprintf(out, n, "{\"order\":\"%s\",\"steps\":%s,\"payment\":%s,\"shipment\":%s,\"delivery\":%s}",
             order, (const char *)deps.ptr, (const char *)payment.ptr, shipment, (const char *)delivery.ptr);
    output(ctx, out);
    free(out);
    sy_buf_free(&deps), sy_buf_free(&payment), sy_buf_free(&delivery);
    return SY_OK;
}

static int fail(const char *what, sy_status st, sy_error *err) {
    fprintf(stderr, "orders: %s: %s: %s\n", what, sy_status_name(st), sy_error_message(err));
    sy_error_free(err);
    return 1;
}

int main(int argc, char **argv) {
    clock_gettime(CLOCK_MONOTONIC, &t0);
    char url[256], dir[] = "/tmp/switchyard-orders-XXXXXX";
    int temp = argc < 2;
    if (temp) {
        if (!mkdtemp(dir)) return perror("mkdtemp"), 1;
        snprintf(url, sizeof url, "sqlite:%s/orders.db", dir);
    } else {
        snprintf(url, sizeof url, "%s", argv[1]);
    }
    const char *order = "A-1001";
    sy_error *err = NULL;
    sy_store *store = NULL;
    sy_client *client = NULL;
    sy_worker *worker = NULL;
    sy_buf id = {0}, result = {0};
    sy_status st;
    say("main", "store %s", url);
    if ((st = sy_store_open(url, &store, &err)) != SY_OK) return fail("open", st, err);
    if ((st = sy_worker_new(store, 4, &worker, &err)) != SY_OK) return fail("worker", st, err);
    if ((st = sy_worker_decision(worker, "order.fulfil", NULL, fulfil, NULL, &err)) ||
        (st = sy_worker_step(worker, "charge.payment", NULL, charge, NULL, &err)) ||
        (st = sy_worker_step(worker, "pack.items", NULL, pack, NULL, &err)) ||
        (st = sy_worker_step(worker, "notify.customer", NULL, notify, NULL, &err)) ||
        (st = sy_worker_step(worker, "order.ship", NULL, ship, NULL, &err)))
        return fail("register", st, err);
    if ((st = sy_worker_start(worker, &err)) != SY_OK) return fail("start", st, err);
    if ((st = sy_client_new(store, &client, &err)) != SY_OK) return fail("client", st, err);

    char input[512];
    snprintf(input, sizeof input,
             "[{\"handler\":\"order.fulfil\",\"idempotency_key\":\"order:%s\",\"input\":"
             "{\"order\":\"%s\",\"email\":\"ada@example.com\",\"total\":42.50,"
             "\"items\":[{\"sku\":\"KB-1\",\"qty\":1},{\"sku\":\"MS-2\",\"qty\":2}]}}]",
             order, order);
    if ((st = sy_client_spawn_many(client, input, &id, &err)) != SY_OK) return fail("spawn", st, err);
    char task[37];
    memcpy(task, id.ptr + 2, 36), task[36] = 0; /* ["<id>"] */
    sy_buf_free(&id);
    say("client", "spawned order.fulfil for order %s (task %s)", order, task);

    /* The payment provider confirms early: the event waits in the store. */
    char name[128];
    sleep_ms(100);
    snprintf(name, sizeof name, "payment.confirmed:%s", order);
    say("provider", "emitting %s", name);
    if ((st = sy_client_emit(client, name, "{\"paid\":42.50}", NULL, &err)) != SY_OK) return fail("emit", st, err);

    /* The courier delivers once the workflow is parked on the delivery. */
    snprintf(name, sizeof name, "shipment.delivered:%s", order);
    for (int i = 0; i < 600; i++) {
        sy_buf detail = {0};
        if ((st = sy_client_inspect(client, task, &detail, &err)) != SY_OK) return fail("inspect", st, err);
        int parked = strstr((const char *)detail.ptr, name) != NULL &&
                     strstr((const char *)detail.ptr, "\"suspended\"") != NULL;
        sy_buf_free(&detail);
        if (parked) break;
        sleep_ms(50);
    }
    sleep_ms(200);
    say("courier", "emitting %s", name);
    if ((st = sy_client_emit(client, name, "{\"signed_by\":\"Ada\"}", NULL, &err)) != SY_OK) return fail("emit", st, err);

    if ((st = sy_client_result(client, task, 60000, &result, &err)) != SY_OK) return fail("result", st, err);
    say("client", "task %s completed; result:", task);
    printf("%s\n", (const char *)result.ptr);
    int ok = strstr((const char *)result.ptr, "\"signed_by\":\"Ada\"") &&
             strstr((const char *)result.ptr, "\"authorisation\":\"AUTH-A-1001\"") &&
             strstr((const char *)result.ptr, "\"tracking\":\"TRK-A-1001\"");
    sy_buf_free(&result);
    sy_worker_free(worker);
    sy_client_free(client);
    sy_store_free(store);
    if (temp) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
        if (system(cmd) != 0) return 1;
    }
    if (!ok) fprintf(stderr, "orders: the result lacks the payment, shipment or delivery\n");
    return ok ? 0 : 1;
}
