"""The Python half of `make demo`: a worker process serving `notify.customer`
for the Rust order-fulfilment workflow, on the same SQLite file.

    python examples/python/notify_worker.py --store sqlite:PATH

Stops gracefully on SIGINT/SIGTERM (the demo sends SIGTERM when the order
is done).
"""

import argparse
import os
import sys
import time

import switchyard


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="store URL shared with the Rust host")
    args = ap.parse_args()

    worker = switchyard.Worker(args.store, concurrency=4)

    @worker.step("notify.customer", timeout=30)
    def notify_customer(input, ctx):
        def send():
            time.sleep(0.1)  # the e-mail provider
            print(
                f"[python pid {os.getpid()}] notify.customer  emailed {input['email']}: order {input['order']} received",
                flush=True,
            )
            return {"sent_to": input["email"], "template": "order-received", "sent_by": "python"}

        # Checkpointed: a retry or replay never e-mails twice.
        return ctx.checkpoint("email", send)

    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
