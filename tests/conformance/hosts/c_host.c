/* The C host of the conformance suite (tests/conformance/).
 *
 *   c_host --store sqlite:PATH --handlers FILE --log PATH
 *
 * FILE has one line per handler of scenarios.json, written by the driver:
 *   name timeout_ms max_attempts initial_backoff_ms max_backoff_ms kind max_batch linger_ms concurrency
 * (0 = the default; kind is step, decision, api or batch). Registers them, prints `ready` once started, and runs
 * until SIGTERM. Handlers append `<task_id> <label>` lines to the log where
 * a scenario counts how often something ran. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "switchyard.h"

static const char *log_path;
static volatile sig_atomic_t stop_requested = 0;

static void on_term(int sig) { (void)sig; stop_requested = 1; }

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Milliseconds since the epoch. */
static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void note(sy_ctx *ctx, const char *label) {
    sy_buf id = {0};
    if (sy_ctx_task_id(ctx, &id, NULL) != SY_OK) return;
    FILE *f = fopen(log_path, "a");
    if (f) {
        fprintf(f, "%s %s\n", (const char *)id.ptr, label);
        fclose(f);
    }
    sy_buf_free(&id);
}

static int32_t output(sy_ctx *ctx, const char *text) {
    sy_ctx_set_output(ctx, text, strlen(text), NULL);
    return SY_OK;
}

static int32_t fail(sy_ctx *ctx, int32_t status, const char *message) {
    sy_ctx_set_output(ctx, message, strlen(message), NULL);
    return status;
}

/* The integer after `"key":` in a JSON text (0 if absent). */
static long num(const char *json, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(json, pat);
    return p ? strtol(p + strlen(pat), NULL, 10) : 0;
}

/* The string after `"key":"` (no escapes), copied into out. */
static void str(const char *json, const char *key, char *out, size_t cap) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":\"", key);
    const char *p = strstr(json, pat);
    out[0] = 0;
    if (!p) return;
    p += strlen(pat);
    size_t n = 0;
    while (p[n] && p[n] != '"' && n + 1 < cap) n++;
    memcpy(out, p, n);
    out[n] = 0;
}

/* checkpoint(name) { note(label); value }: the stored value, or value. */
static int32_t checkpoint(sy_ctx *ctx, const char *name, const char *label, const char *value,
                          char *out, size_t cap) {
    sy_buf v = {0};
    bool found = false;
    int32_t st = sy_ctx_checkpoint_get(ctx, name, &v, &found, NULL);
    if (st != SY_OK) return st;
    if (found) {
        snprintf(out, cap, "%s", (const char *)v.ptr);
        sy_buf_free(&v);
        return SY_OK;
    }
    note(ctx, label);
    st = sy_ctx_checkpoint_put(ctx, name, value, NULL);
    if (st != SY_OK) return st;
    snprintf(out, cap, "%s", value);
    return SY_OK;
}

static int32_t conf_value(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    char *buf = malloc(strlen(input) + 16);
    sprintf(buf, "{\"echo\":%s}", input);
    output(ctx, buf);
    free(buf);
    return SY_OK;
}

static int32_t conf_permanent(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    return fail(ctx, SY_ERROR_PERMANENT, "nope");
}

static int32_t conf_flaky(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    char buf[64];
    uint32_t attempt = sy_ctx_attempt(ctx);
    if (attempt < 3) {
        snprintf(buf, sizeof buf, "flaky on attempt %u", attempt);
        return fail(ctx, SY_ERROR_RETRYABLE, buf);
    }
    snprintf(buf, sizeof buf, "{\"attempt\":%u}", attempt);
    return output(ctx, buf);
}

static int32_t conf_crash(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    /* C has no exceptions: an unexpected status is its "throw". */
    sy_ctx_set_output(ctx, "boom", 4, NULL);
    return 12345;
}

static int32_t conf_checkpoint_once(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    char charged[64], buf[96];
    int32_t st = checkpoint(ctx, "charge", "charge", "42", charged, sizeof charged);
    if (st != SY_OK) return st;
    if (sy_ctx_attempt(ctx) == 1) return fail(ctx, SY_ERROR_RETRYABLE, "failed after the charge");
    snprintf(buf, sizeof buf, "{\"charged\":%s}", charged);
    return output(ctx, buf);
}

static int32_t conf_same_name(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    char a[64], b[64], buf[160];
    int32_t st = checkpoint(ctx, "x", "first", "1", a, sizeof a);
    if (st != SY_OK) return st;
    st = checkpoint(ctx, "x", "second", "2", b, sizeof b);
    if (st != SY_OK) return st;
    snprintf(buf, sizeof buf, "[%s,%s]", a, b);
    return output(ctx, buf);
}

static int32_t conf_await(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    char event[128];
    str(input, "event", event, sizeof event);
    sy_buf payload = {0};
    int32_t st = sy_ctx_await_event(ctx, event, 60000, &payload, NULL);
    if (st != SY_OK) return st;
    char *buf = malloc(payload.len + 16);
    sprintf(buf, "{\"got\":%s}", (const char *)payload.ptr);
    output(ctx, buf);
    free(buf);
    sy_buf_free(&payload);
    return SY_OK;
}

static int32_t conf_await_timeout(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    sy_buf payload = {0};
    int32_t st = sy_ctx_await_event(ctx, "never.sent", 200, &payload, NULL);
    if (st != SY_OK) return st;
    sy_buf_free(&payload);
    return output(ctx, "\"unreachable\"");
}

static int32_t conf_suspensions(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    long n = num(input, "n");
    for (long i = 0; i < n; i++) {
        int32_t st = sy_ctx_sleep(ctx, 20, NULL);
        if (st != SY_OK) return st;
    }
    char buf[64];
    snprintf(buf, sizeof buf, "{\"slept\":%ld}", n);
    return output(ctx, buf);
}

static int32_t conf_timeout(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    sleep_ms(5000);
    return output(ctx, "\"too late\"");
}

static int32_t conf_unrenderable(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    /* C's nearest: an error message that is not UTF-8. */
    static const char bad[] = "bad \xff\xfe bytes";
    sy_ctx_set_output(ctx, bad, sizeof bad - 1, NULL);
    return 12345;
}

/* C's most hostile throw: an unknown status whose message holds a NUL. */
static int32_t conf_hostile(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    static const char msg[] = "before\0after";
    sy_ctx_set_output(ctx, msg, sizeof msg - 1, NULL);
    return -7;
}

/* Holds its slot until the driver's release file exists, or until cancelled
 * (shutdown), for at most 15 s. */
static int32_t conf_hold(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    note(ctx, "start");
    char release[4096];
    snprintf(release, sizeof release, "%s.release", log_path);
    for (int i = 0; i < 750; i++) {
        FILE *f = fopen(release, "r");
        if (f) {
            fclose(f);
            return output(ctx, "{\"released\":true}");
        }
        if (sy_ctx_is_cancelled(ctx)) {
            note(ctx, "stopped");
            return output(ctx, "\"stopped\"");
        }
        sleep_ms(20);
    }
    return output(ctx, "\"never released\"");
}

/* A result with no JSON form: C's nearest are outputs that are not JSON. */
static int32_t conf_unrepresentable(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    const char *text = strstr(input, "\"nan\"") ? "NaN"
                       : strstr(input, "\"cycle\"") ? "{\"self\": "
                                                    : "\"\xff\xfe\"";
    sy_ctx_set_output(ctx, text, strlen(text), NULL);
    return SY_OK;
}

/* Holds its handler's only slot for input.ms milliseconds. */
static int32_t conf_queued(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    note(ctx, "started");
    long ms = num(input, "ms");
    sleep_ms(ms);
    note(ctx, "finished");
    char buf[64];
    snprintf(buf, sizeof buf, "{\"slept\":%ld}", ms);
    return output(ctx, buf);
}

static int32_t conf_invalid(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    sy_ctx_fail(ctx, SY_INVALID_ARGUMENT, "missing field `amount`", -1, NULL);
    return SY_INVALID_ARGUMENT;
}

static int32_t conf_delegate_fails(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    sy_buf r = {0};
    int32_t st = sy_ctx_delegate(ctx, "conf_permanent", "{}", &r, NULL);
    if (st != SY_OK) return st;
    char *buf = malloc(r.len + 16);
    sprintf(buf, "{\"child\":%s}", (const char *)r.ptr);
    output(ctx, buf);
    free(buf);
    sy_buf_free(&r);
    return SY_OK;
}

/* The JSON value starting at p (an object, array, or scalar; no braces
 * inside strings), copied into out. */
static void value_at(const char *p, char *out, size_t cap) {
    size_t n = 0;
    int depth = 0;
    while (p[n]) {
        char c = p[n];
        if (c == '{' || c == '[') depth++;
        else if (c == '}' || c == ']') {
            if (depth == 0) break;
            depth--;
        } else if (c == ',' && depth == 0) break;
        n++;
        if (depth == 0 && (c == '}' || c == ']')) break;
    }
    if (n + 1 > cap) n = cap - 1;
    memcpy(out, p, n);
    out[n] = 0;
}

static int32_t conf_delegate_parallel_fails(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    sy_buf out = {0};
    int32_t st = sy_ctx_delegate_parallel(
        ctx, "[{\"handler\":\"conf_value\",\"input\":{\"i\":1}},{\"handler\":\"conf_permanent\",\"input\":{}}]",
        &out, NULL);
    if (st != SY_OK) return st;
    const char *json = (const char *)out.ptr;
    /* The outcomes are {"task_id","state","result","error"} in order. */
    char states[128] = "", first[256] = "null", message[256] = "";
    const char *p = json;
    while ((p = strstr(p, "\"state\":\"")) != NULL) {
        p += strlen("\"state\":\"");
        size_t n = strcspn(p, "\"");
        snprintf(states + strlen(states), sizeof states - strlen(states), "%s\"%.*s\"",
                 states[0] ? "," : "", (int)n, p);
    }
    p = strstr(json, "\"result\":");
    if (p) value_at(p + strlen("\"result\":"), first, sizeof first);
    p = strstr(json, "\"message\":\"");
    if (p) {
        p += strlen("\"message\":\"");
        snprintf(message, sizeof message, "\"%.*s\"", (int)strcspn(p, "\""), p);
    } else {
        snprintf(message, sizeof message, "null");
    }
    char buf[768];
    snprintf(buf, sizeof buf, "{\"states\":[%s],\"first\":%s,\"second_error\":%s}", states, first, message);
    sy_buf_free(&out);
    return output(ctx, buf);
}

static int32_t conf_cancel_running(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    note(ctx, "started");
    for (int i = 0; i < 500; i++) {
        if (sy_ctx_is_cancelled(ctx)) {
            note(ctx, "saw cancel");
            return SY_CANCELLED;
        }
        sleep_ms(20);
    }
    return output(ctx, "\"never cancelled\"");
}

static int32_t conf_cancel_suspended(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    note(ctx, "started");
    sy_buf payload = {0};
    int32_t st = sy_ctx_await_event(ctx, "never.comes", 60000, &payload, NULL);
    if (st != SY_OK) return st;
    sy_buf_free(&payload);
    return output(ctx, "\"unreachable\"");
}

static int32_t conf_wrong_return(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    return output(ctx, "42");
}

static int32_t conf_api_429(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    char now[32], t0[64], buf[96];
    snprintf(now, sizeof now, "%lld", now_ms());
    int32_t st = checkpoint(ctx, "t0", "t0", now, t0, sizeof t0);
    if (st != SY_OK) return st;
    uint32_t attempt = sy_ctx_attempt(ctx);
    if (attempt == 1) {
        sy_ctx_set_http_error(ctx, 429, 1000, "slow down", NULL);
        return SY_ERROR_RETRYABLE;
    }
    snprintf(buf, sizeof buf, "{\"attempt\":%u,\"waited\":%s}", attempt,
             now_ms() - atoll(t0) >= 900 ? "true" : "false");
    return output(ctx, buf);
}

static int32_t conf_batch(const sy_item *items, size_t count, void *ud) {
    (void)ud;
    for (size_t i = 0; i < count; i++) {
        long n = num(items[i].input, "n");
        char buf[64];
        if (n < 0) {
            snprintf(buf, sizeof buf, "negative: %ld", n);
            sy_ctx_fail(items[i].ctx, SY_ERROR_PERMANENT, buf, -1, NULL);
        } else {
            snprintf(buf, sizeof buf, "{\"double\":%ld}", n * 2);
            sy_ctx_set_output(items[i].ctx, buf, strlen(buf), NULL);
        }
    }
    return SY_OK;
}

/* C has no exceptions: a status other than SY_OK fails the whole call. C
 * gives no message for a whole call, so each item gets it as its output. */
static int32_t conf_batch_fails(const sy_item *items, size_t count, void *ud) {
    (void)ud;
    static const char msg[] = "the whole batch failed";
    for (size_t i = 0; i < count; i++) sy_ctx_set_output(items[i].ctx, msg, sizeof msg - 1, NULL);
    return SY_ERROR_PERMANENT;
}

/* Two parts, then their sum, which depends on both. */
static int32_t conf_plan(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    return output(ctx, "{\"steps\":["
                       "{\"name\":\"a\",\"handler\":\"conf_plan_part\",\"input\":{\"n\":2}},"
                       "{\"name\":\"b\",\"handler\":\"conf_plan_part\",\"input\":{\"n\":3}},"
                       "{\"name\":\"sum\",\"handler\":\"conf_plan_sum\",\"input\":{},\"depends_on\":[\"a\",\"b\"]}"
                       "],\"final_step\":\"sum\"}");
}

/* One check, routed on its status (the check gets the task's input). */
static int32_t conf_route(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)ud;
    char buf[1024];
    snprintf(buf, sizeof buf,
             "{\"steps\":[{\"name\":\"check\",\"handler\":\"conf_route_check\",\"input\":%.*s,"
             "\"routes\":{\"ok\":[{\"name\":\"shipped\",\"handler\":\"conf_route_next\",\"input\":{\"route\":\"ok\"}}],"
             "\"out_of_stock\":[{\"name\":\"backordered\",\"handler\":\"conf_route_next\","
             "\"input\":{\"route\":\"out_of_stock\"}}]}}]}",
             (int)len, input);
    return output(ctx, buf);
}

static int32_t conf_route_check(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    if (strstr(input, "\"status\":\"")) {
        char status[64];
        str(input, "status", status, sizeof status);
        int32_t st = sy_ctx_set_status(ctx, status, NULL);
        if (st != SY_OK) return st;
    }
    char buf[64];
    snprintf(buf, sizeof buf, "{\"qty\":%ld}", num(input, "qty"));
    return output(ctx, buf);
}

static int32_t conf_route_next(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)ud;
    sy_buf deps = {0};
    int32_t st = sy_ctx_dependency_results(ctx, &deps, NULL);
    if (st != SY_OK) return st;
    char buf[512];
    snprintf(buf, sizeof buf, "{\"input\":%.*s,\"saw\":%.*s}", (int)len, input, (int)deps.len, (const char *)deps.ptr);
    sy_buf_free(&deps);
    return output(ctx, buf);
}

static int32_t conf_plan_part(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    char buf[32];
    snprintf(buf, sizeof buf, "%ld", num(input, "n") * 10);
    return output(ctx, buf);
}

static int32_t conf_plan_sum(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    sy_buf deps = {0};
    int32_t st = sy_ctx_dependency_results(ctx, &deps, NULL);
    if (st != SY_OK) return st;
    /* {"a":20,"b":30} */
    const char *json = (const char *)deps.ptr;
    long a = num(json, "a"), b = num(json, "b");
    char buf[96];
    snprintf(buf, sizeof buf, "{\"sum\":%ld,\"from\":[%s%s%s]}", a + b, strstr(json, "\"a\":") ? "\"a\"" : "",
             strstr(json, "\"a\":") && strstr(json, "\"b\":") ? "," : "", strstr(json, "\"b\":") ? "\"b\"" : "");
    sy_buf_free(&deps);
    return output(ctx, buf);
}

static const struct {
    const char *name;
    sy_step_fn fn;
} bodies[] = {
    {"conf_plan", conf_plan},
    {"conf_route", conf_route},
    {"conf_route_check", conf_route_check},
    {"conf_route_next", conf_route_next},
    {"conf_plan_part", conf_plan_part},
    {"conf_plan_sum", conf_plan_sum},
    {"conf_value", conf_value},
    {"conf_permanent", conf_permanent},
    {"conf_flaky", conf_flaky},
    {"conf_crash", conf_crash},
    {"conf_checkpoint_once", conf_checkpoint_once},
    {"conf_same_name", conf_same_name},
    {"conf_await", conf_await},
    {"conf_await_timeout", conf_await_timeout},
    {"conf_suspensions", conf_suspensions},
    {"conf_timeout", conf_timeout},
    {"conf_unrenderable", conf_unrenderable},
    {"conf_hostile", conf_hostile},
    {"conf_hold", conf_hold},
    {"conf_unrepresentable", conf_unrepresentable},
    {"conf_invalid", conf_invalid},
    {"conf_delegate_fails", conf_delegate_fails},
    {"conf_delegate_parallel_fails", conf_delegate_parallel_fails},
    {"conf_cancel_running", conf_cancel_running},
    {"conf_cancel_suspended", conf_cancel_suspended},
    {"conf_wrong_return", conf_wrong_return},
    {"conf_api_429", conf_api_429},
    {"conf_queued_timeout", conf_queued},
    {"conf_queued_cancel", conf_queued},
};

static void die(const char *what, sy_error *err) {
    fprintf(stderr, "c_host: %s: %s\n", what, sy_error_message(err));
    exit(1);
}

int main(int argc, char **argv) {
    const char *store_url = NULL, *handlers = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--store")) store_url = argv[i + 1];
        else if (!strcmp(argv[i], "--handlers")) handlers = argv[i + 1];
        else if (!strcmp(argv[i], "--log")) log_path = argv[i + 1];
    }
    if (!store_url || !handlers || !log_path) {
        fprintf(stderr, "usage: c_host --store URL --handlers FILE --log PATH\n");
        return 2;
    }
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    sy_error *err = NULL;
    sy_store *store = NULL;
    sy_worker *worker = NULL;
    if (sy_store_open(store_url, &store, &err) != SY_OK) die("opening the store", err);
    sy_worker_options wo = sy_worker_options_default();
    wo.concurrency = 16;
    wo.shutdown_grace_ms = 1000;
    if (sy_worker_new_with(store, &wo, &worker, &err) != SY_OK) die("creating the worker", err);
    FILE *f = fopen(handlers, "r");
    if (!f) die("reading the handlers file", NULL);
    char name[128], kind[16];
    unsigned long long timeout_ms, attempts, initial_ms, max_ms, max_batch, linger_ms, concurrency;
    while (fscanf(f, "%127s %llu %llu %llu %llu %15s %llu %llu %llu", name, &timeout_ms, &attempts, &initial_ms,
                  &max_ms, kind, &max_batch, &linger_ms, &concurrency) == 9) {
        sy_handler_options o = sy_handler_options_default();
        o.timeout_ms = timeout_ms;
        o.max_attempts = (uint32_t)attempts;
        o.initial_backoff_ms = initial_ms;
        o.max_backoff_ms = max_ms;
        o.max_batch = (size_t)max_batch;
        o.linger_ms = linger_ms;
        o.concurrency = (size_t)concurrency;
        if (!strcmp(kind, "batch")) {
            sy_batch_fn batch = !strcmp(name, "conf_batch") ? conf_batch
                                : !strcmp(name, "conf_batch_fails") ? conf_batch_fails
                                                                    : NULL;
            if (!batch) {
                fprintf(stderr, "c_host: no batch handler `%s`\n", name);
                return 1;
            }
            if (sy_worker_batch(worker, name, &o, batch, NULL, &err) != SY_OK) die(name, err);
            continue;
        }
        sy_step_fn fn = NULL;
        for (size_t i = 0; i < sizeof bodies / sizeof bodies[0]; i++)
            if (!strcmp(bodies[i].name, name)) fn = bodies[i].fn;
        if (!fn) {
            fprintf(stderr, "c_host: no handler `%s`\n", name);
            return 1;
        }
        sy_status st;
        if (!strcmp(kind, "decision")) st = sy_worker_decision(worker, name, &o, fn, NULL, &err);
        else if (!strcmp(kind, "api")) st = sy_worker_api(worker, name, &o, fn, NULL, &err);
        else st = sy_worker_step(worker, name, &o, fn, NULL, &err);
        if (st != SY_OK) die(name, err);
    }
    fclose(f);
    if (sy_worker_start(worker, &err) != SY_OK) die("starting", err);
    printf("ready\n");
    fflush(stdout);
    while (!stop_requested) sleep_ms(20);
    if (sy_worker_free(worker) != SY_OK) return 1;
    if (sy_store_free(store) != SY_OK) return 1;
    return 0;
}
