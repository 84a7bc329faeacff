/* Exercises every function of include/switchyard.h, errors included.
 * Run by `make test-c` under valgrind (no leaks, no invalid accesses).
 * Prints one line per check; exits 1 on the first failed check. */
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "switchyard.h"

static int checks = 0;

#define CHECK(cond)                                                          \
    do {                                                                     \
        checks++;                                                            \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                  \
            exit(1);                                                         \
        }                                                                    \
    } while (0)


static char last_message[1024]; /* of the last EXPECT */

static void expect(sy_status got, sy_error *err, sy_status want, const char *part, int line) {
    checks++;
    const char *msg = sy_error_message(err);
    if (got != want || (want != SY_OK && (err == NULL || sy_error_status(err) != want)) ||
        (want == SY_OK && err != NULL) || (part && !strstr(msg, part))) {
        fprintf(stderr, "c_api.c:%d: got %s (%s), want %s containing \"%s\"\n", line,
                sy_status_name(got), msg, sy_status_name(want), part ? part : "");
        exit(1);
    }
    printf("ok %d: line %d: %s%s%s\n", checks, line, sy_status_name(got), *msg ? ": " : "", msg);
    snprintf(last_message, sizeof last_message, "%s", msg);
    sy_error_free(err);
}
#define EXPECT(call, want, part)                       \
    do {                                               \
        sy_error *err = NULL;                          \
        sy_status st_ = (call);                        \
        expect(st_, err, (want), (part), __LINE__);    \
    } while (0)
/* `call` must use the local `err`. */

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

struct shared {
    sy_worker *worker;
    int stop_from_callback; /* status of sy_worker_stop inside a callback */
};

static void *other_thread(void *ctx) {
    sy_error *err = NULL;
    sy_status st = sy_ctx_set_output(ctx, "1", 1, &err);
    int ok = st == SY_INVALID_ARGUMENT && strstr(sy_error_message(err), "on its thread");
    sy_error_free(err);
    return ok ? ctx : NULL;
}

/* Echoes its input after exercising the context. */
static int32_t echo(const char *input, size_t len, sy_ctx *ctx, void *user_data) {
    struct shared *sh = user_data;
    sy_error *err = NULL;
    if (sy_ctx_is_cancelled(ctx)) return SY_ERROR_RETRYABLE;
    sy_buf id = {0};
    if (sy_ctx_task_id(ctx, &id, &err) != SY_OK || id.len != 36) return SY_ERROR_PERMANENT;
    sy_buf_free(&id);
    bool stored = false;
    if (sy_ctx_emit_event(ctx, "echo.seen", "{\"ok\":true}", &stored, &err) != SY_OK) {
        sy_ctx_set_output(ctx, sy_error_message(err), strlen(sy_error_message(err)), NULL);
        sy_error_free(err);
        return SY_ERROR_PERMANENT;
    }
    /* Errors inside a callback: invalid JSON, NULL name. */
    if (sy_ctx_emit_event(ctx, "x", "{bad", NULL, &err) != SY_INVALID_ARGUMENT) return SY_ERROR_PERMANENT;
    sy_error_free(err);
    /* The deprecated name is the same function. */
    if (sy_ctx_emit(ctx, "echo.alias", "1", &stored, &err) != SY_OK || !stored) return SY_ERROR_PERMANENT;
    sy_error_free(err);
    if (sy_ctx_emit_event(ctx, NULL, "1", NULL, &err) != SY_INVALID_ARGUMENT) return SY_ERROR_PERMANENT;
    sy_error_free(err);
    /* The context belongs to the callback's thread. */
    pthread_t t;
    void *back = NULL;
    if (pthread_create(&t, NULL, other_thread, ctx) != 0 || pthread_join(t, &back) != 0 || back != ctx)
        return SY_ERROR_PERMANENT;
    /* Stopping the worker from its own callback is refused. */
    sh->stop_from_callback = sy_worker_stop(sh->worker, &err);
    sy_error_free(err);
    sy_worker_free(sh->worker); /* refused too (SY_CONFLICT): the worker lives */
    sy_ctx_set_output(ctx, "ignored", 7, NULL);
    sy_ctx_set_output(ctx, input, len, NULL); /* replaces */
    return SY_OK;
}

/* Fails for good with a message. */
static int32_t boom(const char *input, size_t len, sy_ctx *ctx, void *user_data) {
    (void)input, (void)len, (void)user_data;
    const char *m = "boom: out of widgets";
    sy_ctx_set_output(ctx, m, strlen(m), NULL);
    return SY_ERROR_PERMANENT;
}

/* Returns a result that is not JSON: the step fails permanently. */
static int32_t garbage(const char *input, size_t len, sy_ctx *ctx, void *user_data) {
    (void)input, (void)len, (void)user_data;
    sy_ctx_set_output(ctx, "{not json", 9, NULL);
    return SY_OK;
}

/* Attempt 1 saves a checkpoint and fails retryably; attempt 2 finds it. */
static int32_t twice(const char *input, size_t len, sy_ctx *ctx, void *user_data) {
    (void)input, (void)len, (void)user_data;
    sy_error *err = NULL;
    sy_buf v = {0};
    bool found = true;
    if (sy_ctx_checkpoint_put(ctx, "charge", "1", &err) != SY_CONFLICT) return SY_ERROR_PERMANENT;
    sy_error_free(err);
    if (sy_ctx_checkpoint_get(ctx, "charge", &v, &found, &err) != SY_OK) return SY_ERROR_PERMANENT;
    if (found) {
        sy_ctx_set_output(ctx, (const char *)v.ptr, v.len, NULL);
        sy_buf_free(&v);
        return SY_OK;
    }
    if (sy_ctx_checkpoint_put(ctx, "charge", "{bad", &err) != SY_INVALID_ARGUMENT) return SY_ERROR_PERMANENT;
    sy_error_free(err);
    if (sy_ctx_checkpoint_put(ctx, "charge", "{\"charged\":42}", &err) != SY_OK) return SY_ERROR_PERMANENT;
    return SY_ERROR_RETRYABLE; /* no output: a default message */
}

/* Runs until cancelled; counts the runs that saw it. */
static int slow_saw_cancel = 0;
static int32_t slow(const char *input, size_t len, sy_ctx *ctx, void *user_data) {
    (void)input, (void)len, (void)user_data;
    for (int i = 0; i < 3000 && !sy_ctx_is_cancelled(ctx); i++) sleep_ms(10);
    if (sy_ctx_is_cancelled(ctx)) __atomic_add_fetch(&slow_saw_cancel, 1, __ATOMIC_SEQ_CST);
    return SY_ERROR_RETRYABLE;
}

/* ------------------------------------------------------------------------
 * Handler kinds, options, the durable context and asynchronous completion,
 * on a SQLite file. */

/* The integer after `"key":` in a JSON text (0 if absent). */
static long num(const char *json, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(json, pat);
    return p ? strtol(p + strlen(pat), NULL, 10) : 0;
}

static int32_t set_json(sy_ctx *ctx, const char *fmt, long a, long b) {
    char out[256];
    int n = snprintf(out, sizeof out, fmt, a, b);
    sy_ctx_set_output(ctx, out, (size_t)n, NULL);
    return SY_OK;
}

/* Sleeps 8 times in a row under the default policy (5 attempts): every
 * resume is a new run of the same attempt. */
static int32_t napper(const char *input, size_t len, sy_ctx *ctx, void *user_data) {
    (void)input, (void)len, (void)user_data;
    sy_error *err = NULL;
    for (int i = 0; i < 8; i++) {
        sy_status st = sy_ctx_sleep(ctx, 200, &err);
        if (st != SY_OK) {
            sy_error_free(err);
            return st;
        }
    }
    return set_json(ctx, "{\"attempt\":%ld,\"ran\":%ld}", (long)sy_ctx_attempt(ctx),
                    (long)(sy_ctx_run(ctx) >= 2));
}

/* Decision: checkpoint, then two `add` steps converging on `sum`. */
static int32_t plan(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    sy_error *err = NULL;
    sy_buf v = {0};
    bool found = false;
    if (sy_ctx_checkpoint_get(ctx, "plan", &v, &found, &err) != SY_OK) return SY_ERROR_PERMANENT;
    sy_buf_free(&v);
    if (!found && sy_ctx_checkpoint_put(ctx, "plan", "true", &err) != SY_OK) return SY_ERROR_PERMANENT;
    if (strstr(input, "\"bad\"")) {
        const char *d = "{\"steps\":[{\"name\":\"a\"}]}";
        sy_ctx_set_output(ctx, d, strlen(d), NULL);
        return SY_OK;
    }
    if (strstr(input, "\"done\"")) return set_json(ctx, "{\"complete\":{\"early\":%ld}}", 1, 0);
    /* Documents that are no decision: the error names what is wrong. */
    const char *wrong = strstr(input, "\"list\"")     ? "[1]"
                        : strstr(input, "\"extra\"")  ? "{\"steps\":[],\"then\":1}"
                        : strstr(input, "\"final\"")  ? "{\"steps\":[],\"final_step\":3}"
                        : strstr(input, "\"both\"")   ? "{\"complete\":1,\"steps\":[]}"
                        : strstr(input, "\"none\"")   ? "{}"
                                                        : NULL;
    if (wrong) {
        sy_ctx_set_output(ctx, wrong, strlen(wrong), NULL);
        return SY_OK;
    }
    long x = num(input, "x");
    char d[512];
    int n = snprintf(d, sizeof d,
                     "{\"steps\":[{\"name\":\"a\",\"handler\":\"add\",\"input\":{\"x\":%ld}},"
                     "{\"name\":\"b\",\"handler\":\"add\",\"input\":{\"x\":%ld}},"
                     "{\"name\":\"sum\",\"handler\":\"sum\",\"input\":null,\"depends_on\":[\"a\",\"b\"]}]}",
                     x, x * 10);
    sy_ctx_set_output(ctx, d, (size_t)n, NULL);
    return SY_OK;
}

static int batch_calls = 0, batch_items = 0;

/* Batch: y = x + 1 per item; a negative x fails only its item. */
static int32_t add(const sy_item *items, size_t count, void *ud) {
    (void)ud;
    __atomic_add_fetch(&batch_calls, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&batch_items, (int)count, __ATOMIC_SEQ_CST);
    for (size_t i = 0; i < count; i++) {
        long x = num(items[i].input, "x");
        sy_completion *c = NULL;
        sy_error *err = NULL;
        if (sy_ctx_defer(items[i].ctx, &c, &err) != SY_CONFLICT) return SY_ERROR_PERMANENT;
        sy_error_free(err);
        if (x < 0) {
            sy_ctx_fail(items[i].ctx, SY_ERROR_PERMANENT, "negative input", -1, NULL);
            continue;
        }
        set_json(items[i].ctx, "{\"y\":%ld}", x + 1, 0);
    }
    return SY_OK;
}

/* Convergence: the dependency results, as they are. */
static int32_t sum(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    sy_error *err = NULL;
    sy_buf deps = {0};
    if (strcmp(sy_ctx_step_name(ctx), "sum") != 0) return SY_ERROR_PERMANENT;
    if (sy_ctx_heartbeat(ctx, &err) != SY_OK) return SY_ERROR_PERMANENT;
    sy_status st = sy_ctx_dependency_results(ctx, &deps, &err);
    if (st != SY_OK) return st;
    sy_ctx_set_output(ctx, (const char *)deps.ptr, deps.len, NULL);
    sy_buf_free(&deps);
    return SY_OK;
}

/* Sleeps 50 ms, then awaits the event named in the input. */
static int32_t waiter(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    sy_error *err = NULL;
    sy_status st = sy_ctx_sleep(ctx, 50, &err);
    if (st != SY_OK) {
        int ok = st == SY_SUSPENDED && sy_error_status(err) == SY_SUSPENDED;
        sy_error_free(err);
        return ok ? st : SY_ERROR_PERMANENT;
    }
    long timeout = num(input, "timeout_ms");
    sy_buf payload = {0};
    st = sy_ctx_await_event(ctx, strstr(input, "\"quick\"") ? "never.sent" : "c.go",
                            timeout ? timeout : -1, &payload, &err);
    sy_error_free(err);
    if (st != SY_OK) return st; /* SY_SUSPENDED or SY_AWAIT_TIMEOUT, passed on */
    sy_ctx_set_output(ctx, (const char *)payload.ptr, payload.len, NULL);
    sy_buf_free(&payload);
    return SY_OK;
}

/* Delegates to `add` (one child, then two in parallel) and spawns one. */
static int32_t parent(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    sy_error *err = NULL;
    sy_buf one = {0}, all = {0}, child = {0};
    sy_status st = sy_ctx_delegate(ctx, "add", strstr(input, "\"fail\"") ? "{\"x\":-1}" : "{\"x\":1}", &one, &err);
    sy_error_free(err);
    if (st != SY_OK) return st; /* SY_SUSPENDED, or SY_ERROR_PERMANENT: the child failed */
    /* A bad child is named; nothing is delegated. */
    st = sy_ctx_delegate_parallel(ctx, "[[\"add\",{\"x\":5}],{\"handler\":7}]", &all, &err);
    int named = st == SY_INVALID_ARGUMENT && strstr(sy_error_message(err), "child #1 needs a string `handler`");
    sy_error_free(err);
    if (!named) {
        sy_buf_free(&one);
        return SY_ERROR_PERMANENT;
    }
    /* Children as `[handler, input]` pairs or `{"handler", "input"}` objects. */
    st = sy_ctx_delegate_parallel(ctx, "[[\"add\",{\"x\":5}],"
                                       "{\"handler\":\"add\",\"input\":{\"x\":-1}}]", &all, &err);
    sy_error_free(err);
    if (st != SY_OK) {
        sy_buf_free(&one);
        return st;
    }
    st = sy_ctx_spawn(ctx, "add", "{\"x\":100}", &child, &err);
    sy_error_free(err);
    int ok = st == SY_OK && child.len == 36 && strstr((const char *)all.ptr, "\"completed\"") &&
             strstr((const char *)all.ptr, "negative input");
    char out[256];
    int n = snprintf(out, sizeof out, "{\"one\":%s,\"parallel_ok\":%s}", (const char *)one.ptr,
                     ok ? "true" : "false");
    sy_ctx_set_output(ctx, out, (size_t)n, NULL);
    sy_buf_free(&one);
    sy_buf_free(&all);
    sy_buf_free(&child);
    return SY_OK;
}

/* Spawns `add` with a response event and awaits it (suspending until the
 * child finished); a response event that is no name is refused. Output:
 * {"child":"<id>","event":<the event's payload>}. */
static int32_t responder(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    sy_buf tid = {0}, child = {0}, ev = {0};
    sy_error *err = NULL;
    if (sy_ctx_spawn_with_response_event(ctx, "add", "{\"x\":1}", "", &child, &err) != SY_INVALID_ARGUMENT ||
        !strstr(sy_error_message(err), "response_event")) {
        static const char msg[] = "an empty response_event was not refused";
        sy_error_free(err);
        sy_ctx_set_output(ctx, msg, sizeof msg - 1, NULL);
        return SY_ERROR_PERMANENT;
    }
    sy_error_free(err), err = NULL;
    int32_t st = sy_ctx_task_id(ctx, &tid, NULL);
    if (st != SY_OK) return st;
    char name[96];
    snprintf(name, sizeof name, "c.child.done:%s", (const char *)tid.ptr);
    sy_buf_free(&tid);
    st = sy_ctx_spawn_with_response_event(ctx, "add", "{\"x\":7}", name, &child, &err);
    sy_error_free(err), err = NULL;
    if (st != SY_OK) return st;
    st = sy_ctx_await_event(ctx, name, 30000, &ev, &err);
    sy_error_free(err);
    if (st != SY_OK) {
        sy_buf_free(&child);
        return st;
    }
    char out[512];
    int n = snprintf(out, sizeof out, "{\"child\":\"%s\",\"event\":%s}", (const char *)child.ptr, (const char *)ev.ptr);
    sy_ctx_set_output(ctx, out, (size_t)n, NULL);
    sy_buf_free(&child);
    sy_buf_free(&ev);
    return SY_OK;
}

/* API: 429 with Retry-After on attempt 1, then 200; 404 for "missing". */
static int32_t api(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    if (strstr(input, "\"missing\"")) {
        sy_ctx_set_http_error(ctx, 404, -1, "no such customer", NULL);
        return SY_ERROR_RETRYABLE; /* the core classifies 404 as permanent */
    }
    if (sy_ctx_attempt(ctx) == 1) {
        sy_ctx_set_http_error(ctx, 429, 10, "slow down", NULL);
        return SY_ERROR_RETRYABLE;
    }
    return set_json(ctx, "{\"attempt\":%ld}", (long)sy_ctx_attempt(ctx), 0);
}

struct later {
    sy_completion *c;
    long x;
};

static int refused_completions = 0; /* completions of steps that answered themselves */
static sy_completion *held = NULL;  /* a completion the test completes itself */

static void *complete_later(void *arg) {
    struct later *l = arg;
    sleep_ms(50);
    char out[64];
    int n = snprintf(out, sizeof out, "{\"later\":%ld}", l->x);
    sy_error *err = NULL;
    sy_status st = sy_completion_complete(l->c, SY_OK, out, (size_t)n, &err);
    if (l->x == -1 && st == SY_CONFLICT && strstr(sy_error_message(err), "answered itself"))
        __atomic_add_fetch(&refused_completions, 1, __ATOMIC_SEQ_CST);
    else if (st != SY_OK)
        fprintf(stderr, "complete_later: %s\n", sy_error_message(err));
    sy_error_free(err);
    free(l);
    return NULL;
}

/* Defers; a thread of ours completes it. "abandon" frees the completion. */
static int32_t deferred(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ud;
    sy_error *err = NULL;
    sy_completion *c = NULL;
    if (strstr(input, "\"pending_only\"")) return SY_PENDING; /* without sy_ctx_defer */
    if (sy_ctx_defer(ctx, &c, &err) != SY_OK) return SY_ERROR_PERMANENT;
    if (sy_ctx_defer(ctx, &c, &err) != SY_CONFLICT) return SY_ERROR_PERMANENT;
    sy_error_free(err);
    if (strstr(input, "\"hold\"")) {
        __atomic_store_n(&held, c, __ATOMIC_SEQ_CST);
        return SY_PENDING;
    }
    if (strstr(input, "\"abandon\"")) {
        sy_completion_free(c);
        return SY_PENDING;
    }
    if (strstr(input, "\"self\"")) {
        /* Deferred, but answered synchronously: the completion is refused. */
        set_json(ctx, "{\"self\":%ld}", 1, 0);
        struct later *l = malloc(sizeof *l);
        l->c = c, l->x = -1;
        pthread_t t;
        pthread_create(&t, NULL, complete_later, l);
        pthread_detach(t);
        return SY_OK;
    }
    CHECK(!sy_completion_is_cancelled(c));
    struct later *l = malloc(sizeof *l);
    l->c = c, l->x = num(input, "x");
    pthread_t t;
    pthread_create(&t, NULL, complete_later, l);
    pthread_detach(t);
    return SY_PENDING;
}

/* Catches an await that timed out (SY_AWAIT_TIMEOUT, with the event in the
 * error's details) and carries on. */
static int32_t catcher(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    sy_error *err = NULL;
    sy_buf payload = {0};
    sy_status st = sy_ctx_await_event(ctx, "never.caught", 50, &payload, &err);
    if (st == SY_SUSPENDED) {
        sy_error_free(err);
        return st;
    }
    const char *d = sy_error_detail_json(err);
    long ok = st == SY_AWAIT_TIMEOUT && sy_error_status(err) == SY_AWAIT_TIMEOUT &&
              strstr(sy_error_message(err), "never.caught") != NULL && d != NULL &&
              strcmp(d, "{\"event\":\"never.caught\"}") == 0;
    if (!ok) fprintf(stderr, "catcher: %s: %s (%s)\n", sy_status_name(st), sy_error_message(err), d ? d : "no detail");
    sy_error_free(err);
    sy_buf_free(&payload);
    return set_json(ctx, "{\"caught\":%ld}", ok, 0);
}

/* Returns SY_SUSPENDED though no context call asked for it. */
static int32_t fake_suspend(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ctx, (void)ud;
    return SY_SUSPENDED;
}

static int waits_parked = 0; /* suspensions of `waits` so far */

/* Awaits 50 events in a row (go-0 ... go-49), each emitted by the test
 * after the previous suspension: 51 runs of one attempt. */
static int32_t waits(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    for (int i = 0; i < 50; i++) {
        char name[32];
        snprintf(name, sizeof name, "go-%d", i);
        sy_buf payload = {0};
        sy_error *err = NULL;
        sy_status st = sy_ctx_await_event(ctx, name, -1, &payload, &err);
        sy_error_free(err);
        if (st != SY_OK) {
            if (st == SY_SUSPENDED) __atomic_add_fetch(&waits_parked, 1, __ATOMIC_SEQ_CST);
            return st;
        }
        sy_buf_free(&payload);
    }
    return set_json(ctx, "{\"attempt\":%ld,\"run\":%ld}", (long)sy_ctx_attempt(ctx), (long)sy_ctx_run(ctx));
}

/* Returns the status its input names, with no output. */
static int32_t by_status(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ctx, (void)ud;
    return (int32_t)num(input, "status");
}

static int32_t noop(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ctx, (void)ud;
    return SY_OK;
}

static void durable_checks(void) {
    char dir[] = "/tmp/switchyard-c-api-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char url[128];
    snprintf(url, sizeof url, "sqlite:%s/t.db", dir);
    sy_store *store = NULL;
    sy_client *client = NULL;
    sy_worker *worker = NULL;
    sy_buf id = {0}, res = {0};
    EXPECT(sy_store_open(url, &store, &err), SY_OK, NULL);
    EXPECT(sy_client_new(store, &client, &err), SY_OK, NULL);
    EXPECT(sy_worker_new(store, 4, &worker, &err), SY_OK, NULL);

    /* Options: defaults, and fields that do not fit the handler kind. */
    sy_handler_options o = sy_handler_options_default();
    CHECK(o.concurrency == 0 && o.max_batch == 0 && o.rate_limit == 0.0);
    o.max_batch = 8;
    EXPECT(sy_worker_step(worker, "x", &o, noop, NULL, &err), SY_INVALID_ARGUMENT, "options.max_batch applies to batch");
    o = sy_handler_options_default();
    o.rate_limit = 5;
    EXPECT(sy_worker_decision(worker, "x", &o, noop, NULL, &err), SY_INVALID_ARGUMENT, "options.rate_limit applies to api handlers only");
    o.rate_limit = -1;
    EXPECT(sy_worker_api(worker, "x", &o, noop, NULL, &err), SY_INVALID_ARGUMENT, "rate_limit must be a positive");
    EXPECT(sy_worker_batch(worker, "x", NULL, NULL, NULL, &err), SY_INVALID_ARGUMENT, "callback is NULL");
    EXPECT(sy_worker_step(worker, " ", NULL, noop, NULL, &err), SY_INVALID_ARGUMENT, "must not be empty");

    EXPECT(sy_worker_decision(worker, "plan", NULL, plan, NULL, &err), SY_OK, NULL);
    o = sy_handler_options_default();
    o.max_batch = 16, o.linger_ms = 20, o.concurrency = 2;
    EXPECT(sy_worker_batch(worker, "add", &o, add, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "sum", NULL, sum, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "waiter", NULL, waiter, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "parent", NULL, parent, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "responder", NULL, responder, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "napper", NULL, napper, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "catcher", NULL, catcher, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "fake_suspend", NULL, fake_suspend, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "waits", NULL, waits, NULL, &err), SY_OK, NULL);
    o = sy_handler_options_default();
    o.max_attempts = 2, o.initial_backoff_ms = 10, o.max_backoff_ms = 10;
    EXPECT(sy_worker_step(worker, "by_status", &o, by_status, NULL, &err), SY_OK, NULL);
    o = sy_handler_options_default();
    o.rate_limit = 1000, o.rate_burst = 10, o.max_attempts = 3;
    EXPECT(sy_worker_api(worker, "api", &o, api, NULL, &err), SY_OK, NULL);
    o = sy_handler_options_default();
    o.max_attempts = 1, o.timeout_ms = 20000;
    EXPECT(sy_worker_step(worker, "deferred", &o, deferred, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_start(worker, &err), SY_OK, NULL);

#define RUN(handler, input, want_status, want_part)                                    \
    do {                                                                                \
        EXPECT(sy_client_spawn(client, handler, input, &id, &err), SY_OK, NULL);        \
        EXPECT(sy_client_result(client, (const char *)id.ptr, 30000, &res, &err),       \
               want_status, want_status == SY_OK ? NULL : want_part);                   \
        if (want_status == SY_OK) {                                                     \
            if (!strstr((const char *)res.ptr, want_part)) {                            \
                fprintf(stderr, "%s: result %s lacks %s\n", handler, res.ptr, want_part); \
                exit(1);                                                                \
            }                                                                           \
            printf("ok: %s -> %s\n", handler, (const char *)res.ptr);                  \
        }                                                                               \
        sy_buf_free(&res);                                                              \
    } while (0)

    /* Decision + batch + convergence through dependency results. */
    RUN("plan", "{\"x\":2}", SY_OK, "\"a\":{\"y\":3}");
    EXPECT(sy_client_inspect(client, (const char *)id.ptr, &res, &err), SY_OK, NULL);
    CHECK(strstr((const char *)res.ptr, "\"sum\"") != NULL);
    sy_buf_free(&res);
    sy_buf_free(&id);
    EXPECT(sy_client_count_steps(client, &res, &err), SY_OK, NULL);
    CHECK(strstr((const char *)res.ptr, "\"completed\":4") != NULL); /* plan, a, b, sum */
    sy_buf_free(&res);
    EXPECT(sy_client_count_steps(NULL, &res, &err), SY_INVALID_ARGUMENT, "client is NULL");
    EXPECT(sy_client_count_steps(client, NULL, &err), SY_INVALID_ARGUMENT, "counts is NULL");
    RUN("plan", "{\"done\":1}", SY_OK, "\"early\":1");
    sy_buf_free(&id);
    /* ctx spawn with a response event, awaited by the spawning step. */
    RUN("responder", "{}", SY_OK, "\"event\":{\"error\":null,\"result\":{\"y\":8},\"state\":\"completed\",\"task_id\":");
    sy_buf_free(&id);
    /* The steps are checked by the core (Reply::decision_steps), as for
     * every binding; the document around them here. */
    RUN("plan", "{\"bad\":1}", SY_TASK_FAILED, "decision handler `plan`: each step needs `name`, `handler`");
    sy_buf_free(&id);
    RUN("plan", "{\"list\":1}", SY_TASK_FAILED, "decision handler `plan`: a decision must be an object with `steps` or `complete`, not a list");
    sy_buf_free(&id);
    RUN("plan", "{\"extra\":1}", SY_TASK_FAILED, "unknown key `then` in a decision");
    sy_buf_free(&id);
    RUN("plan", "{\"final\":1}", SY_TASK_FAILED, "`final_step` must be a step name, not a number");
    sy_buf_free(&id);
    RUN("plan", "{\"both\":1}", SY_TASK_FAILED, "a `complete` decision has no other keys (found `steps`)");
    sy_buf_free(&id);
    RUN("plan", "{\"none\":1}", SY_TASK_FAILED, "a decision needs `steps` (a list) or `complete`");
    sy_buf_free(&id);

    /* Many batch items at once: fewer calls than items, one failing alone. */
    EXPECT(sy_client_spawn_many(client, "[{\"handler\":\"add\",\"input\":{\"x\":1}},"
                                        "{\"handler\":\"add\",\"input\":{\"x\":-5},\"priority\":3}]",
                                &res, &err), SY_OK, NULL);
    CHECK(res.ptr[0] == '[' && res.len == 2 + 2 * 38 + 1);
    char first[37], second[37];
    memcpy(first, res.ptr + 2, 36), first[36] = 0;
    memcpy(second, res.ptr + 2 + 39, 36), second[36] = 0;
    sy_buf_free(&res);
    EXPECT(sy_client_result(client, first, 30000, &res, &err), SY_OK, NULL);
    CHECK(strcmp((const char *)res.ptr, "{\"y\":2}") == 0);
    sy_buf_free(&res);
    EXPECT(sy_client_result(client, second, 30000, &res, &err), SY_TASK_FAILED, "negative input");
    EXPECT(sy_client_spawn_many(client, "{\"handler\":\"add\"}", &res, &err), SY_INVALID_ARGUMENT, "must be a list");
    EXPECT(sy_client_spawn_many(client, "[{\"input\":1}]", &res, &err), SY_INVALID_ARGUMENT, "handler");
    /* A misspelt key is refused, not dropped; `parent` is not the client's. */
    EXPECT(sy_client_spawn_many(client, "[{\"handler\":\"add\",\"input\":1},{\"handler\":\"add\",\"input\":2,\"prio\":3}]",
                                &res, &err), SY_INVALID_ARGUMENT, "task #1: unknown key `prio`");
    CHECK(res.ptr == NULL);
    EXPECT(sy_client_spawn_many(client, "[{\"handler\":\"add\",\"input\":1,\"parent\":{}}]", &res, &err),
           SY_INVALID_ARGUMENT, "task #0: `parent`");
    CHECK(batch_items >= 4 && batch_calls >= 1);

    /* Retry of a failed task: it fails again the same way (input negative). */
    EXPECT(sy_client_retry(client, second, &err), SY_OK, NULL);
    EXPECT(sy_client_result(client, second, 30000, &res, &err), SY_TASK_FAILED, "negative input");
    EXPECT(sy_client_retry(client, first, &err), SY_CONFLICT, "");
    EXPECT(sy_client_retry(client, "nope", &err), SY_INVALID_ARGUMENT, "nope");
    EXPECT(sy_client_inspect(client, "01a208c8-9154-723f-b462-c8823cc81823", &res, &err), SY_NOT_FOUND, "");

    /* Sleep, then suspend on an event that arrives later. */
    EXPECT(sy_client_spawn(client, "waiter", "{}", &id, &err), SY_OK, NULL);
    EXPECT(sy_client_result(client, (const char *)id.ptr, 400, &res, &err), SY_TIMEOUT, "");
    EXPECT(sy_client_inspect(client, (const char *)id.ptr, &res, &err), SY_OK, NULL);
    CHECK(strstr((const char *)res.ptr, "c.go") != NULL); /* the parked wait */
    sy_buf_free(&res);
    EXPECT(sy_client_emit(client, "c.go", "{\"go\":7}", NULL, &err), SY_OK, NULL);
    EXPECT(sy_client_result(client, (const char *)id.ptr, 30000, &res, &err), SY_OK, NULL);
    CHECK(strcmp((const char *)res.ptr, "{\"go\":7}") == 0);
    sy_buf_free(&res);
    sy_buf_free(&id);
    /* An event emitted earlier is returned at once (replayed on resume). */
    RUN("waiter", "{\"later\":1}", SY_OK, "\"go\":7");
    sy_buf_free(&id);
    /* An await timeout caught by the callback: it carries on. */
    RUN("catcher", "{}", SY_OK, "{\"caught\":1}");
    sy_buf_free(&id);
    /* One passed on (SY_AWAIT_TIMEOUT returned) fails the step permanently,
     * with the await's message. */
    RUN("waiter", "{\"quick\":1,\"timeout_ms\":100}", SY_TASK_FAILED, "permanent: timed out waiting for event `never.sent`");
    sy_buf_free(&id);

    /* A status returned is its error class: SY_INVALID_ARGUMENT is never
     * retried; a value that is no status is retryable. */
    RUN("by_status", "{\"status\":1}", SY_TASK_FAILED,
        "failed on attempt 1: invalid_input: invalid input: the C handler `by_status` failed with status 1 (SY_INVALID_ARGUMENT)");
    sy_buf_free(&id);
    RUN("by_status", "{\"status\":99}", SY_TASK_FAILED,
        "failed on attempt 2: retryable: attempt 2 of 2 failed: the C handler `by_status` failed with status 99 (SY_UNKNOWN)");
    sy_buf_free(&id);

    /* SY_SUSPENDED returned by hand fails the step, with the core's message. */
    RUN("fake_suspend", "{}", SY_TASK_FAILED, "raised Suspend but no context call asked it to");
    sy_buf_free(&id);

    /* 50 suspensions in a row: one attempt, 51 runs. */
    EXPECT(sy_client_spawn(client, "waits", "null", &id, &err), SY_OK, NULL);
    for (int i = 0; i < 50; i++) {
        for (int t = 0; t < 30000 && __atomic_load_n(&waits_parked, __ATOMIC_SEQ_CST) < i + 1; t++) sleep_ms(1);
        CHECK(__atomic_load_n(&waits_parked, __ATOMIC_SEQ_CST) == i + 1);
        char name[32];
        snprintf(name, sizeof name, "go-%d", i);
        sy_error *err = NULL;
        CHECK(sy_client_emit(client, name, "null", NULL, &err) == SY_OK);
    }
    EXPECT(sy_client_result(client, (const char *)id.ptr, 60000, &res, &err), SY_OK, NULL);
    CHECK(strcmp((const char *)res.ptr, "{\"attempt\":1,\"run\":51}") == 0);
    printf("ok: 50 suspensions in a row -> %s\n", (const char *)res.ptr);
    sy_buf_free(&res);
    sy_buf_free(&id);

    /* Delegation and spawn from a step. */
    RUN("parent", "{}", SY_OK, "{\"one\":{\"y\":2},\"parallel_ok\":true}");
    sy_buf_free(&id);
    /* A child's failure passed on (no output): the step fails with its message. */
    RUN("parent", "{\"fail\":1}", SY_TASK_FAILED, "permanent: delegated task");
    CHECK(strstr(last_message, "(add) failed: negative input") != NULL);
    sy_buf_free(&id);

    /* Eight sleeps in a row cost no attempt. */
    RUN("napper", "{}", SY_OK, "{\"attempt\":1,\"ran\":1}");
    sy_buf_free(&id);

    /* API: 429 then success; 404 fails at once. */
    RUN("api", "{}", SY_OK, "\"attempt\":2");
    sy_buf_free(&id);
    RUN("api", "{\"missing\":1}", SY_TASK_FAILED, "HTTP 404: no such customer");
    sy_buf_free(&id);

    /* Asynchronous completion from another thread. */
    RUN("deferred", "{\"x\":9}", SY_OK, "{\"later\":9}");
    sy_buf_free(&id);
    RUN("deferred", "{\"abandon\":1}", SY_TASK_FAILED, "released its completion without completing it");
    sy_buf_free(&id);
    RUN("deferred", "{\"pending_only\":1}", SY_TASK_FAILED, "call sy_ctx_defer first");
    sy_buf_free(&id);
    RUN("deferred", "{\"self\":1}", SY_OK, "{\"self\":1}");
    sy_buf_free(&id);
    sleep_ms(200); /* the refused completion's thread finishes */
    CHECK(refused_completions == 1);

    /* A deferred step cancelled while pending: its completion sees it, and
     * completing after the cancel grace period (2 s) is refused. */
    EXPECT(sy_client_spawn(client, "deferred", "{\"hold\":1}", &id, &err), SY_OK, NULL);
    for (int i = 0; i < 3000 && __atomic_load_n(&held, __ATOMIC_SEQ_CST) == NULL; i++) sleep_ms(10);
    CHECK(held != NULL && !sy_completion_is_cancelled(held));
    EXPECT(sy_client_cancel(client, (const char *)id.ptr, false, NULL, &err), SY_OK, NULL);
    for (int i = 0; i < 3000 && !sy_completion_is_cancelled(held); i++) sleep_ms(10);
    CHECK(sy_completion_is_cancelled(held));
    EXPECT(sy_client_result(client, (const char *)id.ptr, 30000, &res, &err), SY_TASK_CANCELLED, "cancelled");
    sleep_ms(2500);
    EXPECT(sy_completion_complete(held, SY_OK, "1", 1, &err), SY_CONFLICT, "no longer waiting");
    EXPECT(sy_completion_complete(held, SY_OK, "1", 1, &err), SY_INVALID_ARGUMENT, "not a live handle");
    sy_buf_free(&id);

    /* Completion and new context functions outside a callback. */
    CHECK(!sy_completion_is_cancelled(NULL));
    CHECK(sy_completion_free(NULL) == SY_INVALID_ARGUMENT);
    EXPECT(sy_completion_complete(NULL, SY_OK, "1", 1, &err), SY_INVALID_ARGUMENT, "not a live handle");
    EXPECT(sy_ctx_sleep(NULL, 1, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_await_event(NULL, "e", -1, &res, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_delegate(NULL, "h", "1", &res, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_delegate_parallel(NULL, "[]", &res, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_spawn(NULL, "h", "1", &res, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_dependency_results(NULL, &res, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_heartbeat(NULL, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_fail(NULL, SY_ERROR_PERMANENT, "m", -1, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_set_http_error(NULL, 500, -1, "m", &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_defer(NULL, NULL, &err), SY_INVALID_ARGUMENT, "completion is NULL");
    CHECK(sy_ctx_attempt(NULL) == 0);
    CHECK(sy_ctx_run(NULL) == 0);
    CHECK(strcmp(sy_ctx_step_name(NULL), "") == 0);

    /* A forked child cannot use the parent's runtime: every call says so.
     * The child reports through a pipe and ends with SIGKILL, so that
     * valgrind does not leak-check a process whose threads were left behind
     * in the parent. */
    int fds[2];
    CHECK(pipe(fds) == 0);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        sy_error *err = NULL;
        sy_status st = sy_client_spawn(client, "add", "{\"x\":1}", &id, &err);
        char ok = st == SY_CONFLICT && strstr(sy_error_message(err), "forked") != NULL ? 'y' : 'n';
        if (ok != 'y') fprintf(stderr, "forked child: %s: %s\n", sy_status_name(st), sy_error_message(err));
        if (write(fds[1], &ok, 1) != 1) ok = 'n';
        kill(getpid(), SIGKILL);
    }
    close(fds[1]);
    char answer = 0;
    CHECK(pid > 0 && read(fds[0], &answer, 1) == 1 && answer == 'y');
    close(fds[0]);
    int wstatus = 0;
    CHECK(waitpid(pid, &wstatus, 0) == pid);
    printf("ok: a forked child gets SY_CONFLICT\n");

    CHECK(sy_worker_free(worker) == SY_OK);
    CHECK(sy_client_free(client) == SY_OK);
    CHECK(sy_store_free(store) == SY_OK);
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
}

/* ------------------------------------------------------------------------
 * Jobs the core gave up on are never started, and sy_worker_stop does not
 * wait forever for a callback that ignores cancellation. */

static int stubborn_a = 0, stubborn_b = 0, stubborn_a_done = 0;

/* "a" sleeps 5 s without looking at cancellation; "b" returns at once. */
static int32_t stubborn(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ctx, (void)ud;
    if (strstr(input, "\"a\"")) {
        __atomic_add_fetch(&stubborn_a, 1, __ATOMIC_SEQ_CST);
        sleep_ms(5000);
        __atomic_store_n(&stubborn_a_done, 1, __ATOMIC_SEQ_CST);
    } else {
        __atomic_add_fetch(&stubborn_b, 1, __ATOMIC_SEQ_CST);
    }
    return SY_OK;
}

/* Polls for cancellation: how many runs saw it. */
static int polite_saw = 0;
static int32_t polite(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ud;
    for (int i = 0; i < 500 && !sy_ctx_is_cancelled(ctx); i++) sleep_ms(2);
    if (sy_ctx_is_cancelled(ctx)) __atomic_add_fetch(&polite_saw, 1, __ATOMIC_SEQ_CST);
    return SY_OK;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void stop_checks(void) {
    sy_store *store = NULL;
    sy_client *client = NULL;
    sy_worker *worker = NULL;
    sy_buf a = {0}, b = {0}, res = {0};
    EXPECT(sy_store_open("memory", &store, &err), SY_OK, NULL);
    EXPECT(sy_client_new(store, &client, &err), SY_OK, NULL);
    sy_worker_options wo = sy_worker_options_default();
    wo.concurrency = 1;
    wo.shutdown_grace_ms = 200;
    EXPECT(sy_worker_new_with(store, &wo, &worker, &err), SY_OK, NULL);
    sy_worker *bad = NULL;
    wo.shutdown_grace_ms = (uint64_t)1 << 62;
    EXPECT(sy_worker_new_with(store, &wo, &bad, &err), SY_INVALID_ARGUMENT, "options.shutdown_grace_ms");
    CHECK(bad == NULL);
    wo.shutdown_grace_ms = 200;
    sy_handler_options ho = sy_handler_options_default();
    ho.timeout_ms = 200;
    ho.max_attempts = 1;
    EXPECT(sy_worker_step(worker, "stubborn", &ho, stubborn, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "polite", &ho, polite, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_start(worker, &err), SY_OK, NULL);
    /* A running callback is told that its step timed out. */
    EXPECT(sy_client_spawn(client, "polite", "{}", &a, &err), SY_OK, NULL);
    EXPECT(sy_client_result(client, (const char *)a.ptr, 30000, &res, &err), SY_TASK_FAILED, "timed out after 200 ms");
    sy_buf_free(&a);
    for (int i = 0; i < 300 && !__atomic_load_n(&polite_saw, __ATOMIC_SEQ_CST); i++) sleep_ms(10);
    CHECK(__atomic_load_n(&polite_saw, __ATOMIC_SEQ_CST) == 1);
    printf("ok: a timed-out callback sees sy_ctx_is_cancelled\n");
    /* "a" holds the only callback thread for 5 s and times out after
     * 200 ms; "b" is then dispatched, waits in the queue behind it and
     * times out there: its callback must never start. */
    EXPECT(sy_client_spawn(client, "stubborn", "{\"who\":\"a\"}", &a, &err), SY_OK, NULL);
    while (__atomic_load_n(&stubborn_a, __ATOMIC_SEQ_CST) == 0) sleep_ms(5);
    EXPECT(sy_client_spawn(client, "stubborn", "{\"who\":\"b\"}", &b, &err), SY_OK, NULL);
    EXPECT(sy_client_result(client, (const char *)a.ptr, 30000, &res, &err), SY_TASK_FAILED, "timed out after 200 ms");
    EXPECT(sy_client_result(client, (const char *)b.ptr, 30000, &res, &err), SY_TASK_FAILED, "timed out after 200 ms");
    /* Stop while "a" still sleeps: the grace period, then at most 2 s. */
    double t0 = now_s();
    EXPECT(sy_worker_stop(worker, &err), SY_OK, NULL);
    double took = now_s() - t0;
    printf("ok: sy_worker_stop returned after %.2f s with a callback still running\n", took);
    CHECK(took < 4.0);
    CHECK(!__atomic_load_n(&stubborn_a_done, __ATOMIC_SEQ_CST));
    /* Let the detached callback finish before checking and freeing. */
    for (int i = 0; i < 1000 && !__atomic_load_n(&stubborn_a_done, __ATOMIC_SEQ_CST); i++) sleep_ms(10);
    sleep_ms(300);
    CHECK(__atomic_load_n(&stubborn_a_done, __ATOMIC_SEQ_CST));
    CHECK(__atomic_load_n(&stubborn_a, __ATOMIC_SEQ_CST) == 1);
    CHECK(__atomic_load_n(&stubborn_b, __ATOMIC_SEQ_CST) == 0);
    printf("ok: a job abandoned while queued never started its callback\n");
    sy_buf_free(&a);
    sy_buf_free(&b);
    CHECK(sy_worker_free(worker) == SY_OK);
    CHECK(sy_client_free(client) == SY_OK);
    CHECK(sy_store_free(store) == SY_OK);
}

/* ------------------------------------------------------------------------
 * Idle callback threads sleep until there is a job or the worker stops. */

/* Context switches so far of this process's callback threads. */
static long callback_thread_switches(int *threads) {
    long total = 0;
    *threads = 0;
    DIR *d = opendir("/proc/self/task");
    CHECK(d != NULL);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char path[300], line[256];
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue; /* the thread has left */
        int ours = fgets(line, sizeof line, f) && strncmp(line, "switchyard-c-", 13) == 0;
        fclose(f);
        if (!ours) continue;
        snprintf(path, sizeof path, "/proc/self/task/%s/status", e->d_name);
        if (!(f = fopen(path, "r"))) continue;
        while (fgets(line, sizeof line, f)) {
            if (strncmp(line, "voluntary_ctxt_switches:", 24) == 0 ||
                strncmp(line, "nonvoluntary_ctxt_switches:", 27) == 0)
                total += strtol(strchr(line, ':') + 1, NULL, 10);
        }
        fclose(f);
        (*threads)++;
    }
    closedir(d);
    return total;
}

static void idle_checks(void) {
    sy_store *store = NULL;
    sy_worker *worker = NULL;
    EXPECT(sy_store_open("memory", &store, &err), SY_OK, NULL);
    EXPECT(sy_worker_new(store, 32, &worker, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "noop", NULL, noop, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_start(worker, &err), SY_OK, NULL);
    sleep_ms(300);
    int threads = 0, again = 0;
    long before = callback_thread_switches(&threads);
    sleep_ms(1000);
    long woke = callback_thread_switches(&again) - before;
    printf("ok: %d idle callback threads switched %ld times in 1 s\n", threads, woke);
    /* This worker's 32, and the 2 of the one main() keeps running. */
    CHECK(threads == 34 && again == 34);
    /* Waking every 200 ms would be 5 a second each (170). */
    CHECK(woke < 34);
    CHECK(sy_worker_free(worker) == SY_OK);
    CHECK(sy_store_free(store) == SY_OK);
}

/* GET `path` from `addr` ("127.0.0.1:PORT"); the whole answer in `out`. */
static int http_get(const char *addr, const char *path, char *out, size_t cap) {
    char host[64];
    snprintf(host, sizeof host, "%s", addr);
    char *colon = strrchr(host, ':');
    if (!colon) return -1;
    *colon = 0;
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) return -1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    char req[256];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", path);
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    size_t got = 0;
    ssize_t r;
    while (got + 1 < cap && (r = read(fd, out + got, cap - 1 - got)) > 0) got += (size_t)r;
    out[got] = 0;
    close(fd);
    return 0;
}

/* options.health_listen serves the core's endpoint (lang="c"); the client
 * waits for an event from outside any task. */
static void health_checks(void) {
    static char page[1 << 16];
    sy_store *store = NULL;
    sy_client *client = NULL;
    sy_worker *worker = NULL, *bad = NULL;
    sy_buf addr = {0}, payload = {0};
    EXPECT(sy_store_open("memory", &store, &err), SY_OK, NULL);
    EXPECT(sy_client_new(store, &client, &err), SY_OK, NULL);
    sy_worker_options wo = sy_worker_options_default();
    wo.concurrency = 2;
    wo.health_listen = "localhost:80";
    EXPECT(sy_worker_new_with(store, &wo, &bad, &err), SY_INVALID_ARGUMENT,
           "options.health_listen must be an address");
    wo.health_listen = "127.0.0.1:0";
    EXPECT(sy_worker_new_with(store, &wo, &worker, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "noop", NULL, noop, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_health_addr(worker, &addr, &err), SY_NOT_FOUND, "no health endpoint");
    EXPECT(sy_worker_start(worker, &err), SY_OK, NULL);
    EXPECT(sy_worker_health_addr(worker, &addr, &err), SY_OK, NULL);
    CHECK(strncmp((const char *)addr.ptr, "127.0.0.1:", 10) == 0);
    CHECK(http_get((const char *)addr.ptr, "/healthz", page, sizeof page) == 0);
    CHECK(strstr(page, "HTTP/1.1 200") == page && strstr(page, "\r\n\r\nok\n"));
    CHECK(http_get((const char *)addr.ptr, "/metrics", page, sizeof page) == 0);
    CHECK(strstr(page, "lang=\"c\"") != NULL);
    CHECK(strstr(page, "switchyard_slots_free{handler=\"noop\"} 2") != NULL);

    EXPECT(sy_client_emit(client, "c.reply", "{\"n\":1}", NULL, &err), SY_OK, NULL);
    EXPECT(sy_client_emit(client, "c.reply", "{\"n\":2}", NULL, &err), SY_OK, NULL);
    EXPECT(sy_client_await_event(client, "c.reply", 5000, &payload, &err), SY_OK, NULL);
    CHECK(strcmp((const char *)payload.ptr, "{\"n\":1}") == 0);
    sy_buf_free(&payload);
    EXPECT(sy_client_await_event(client, "c.never", 100, &payload, &err), SY_TIMEOUT, "`c.never`");
    EXPECT(sy_client_await_event(client, "", 100, &payload, &err), SY_INVALID_ARGUMENT, "event name");
    EXPECT(sy_client_await_event(client, NULL, 100, &payload, &err), SY_INVALID_ARGUMENT, "name is NULL");

    sy_buf_free(&addr);
    CHECK(sy_worker_free(worker) == SY_OK);
    CHECK(sy_client_free(client) == SY_OK);
    CHECK(sy_store_free(store) == SY_OK);
}

/* Writes `text` to DIR/NAME; the path goes to `path`. */
static void write_file(const char *dir, const char *name, const char *text, char *path, size_t cap) {
    snprintf(path, cap, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    CHECK(fputs(text, f) >= 0);
    CHECK(fclose(f) == 0);
}

/* sy_worker_new_from_config: the configured store, host name and
 * concurrency are used; a bad key or type is SY_CONFIG naming the key and
 * the file. */
static void config_checks(void) {
    static char page[1 << 16];
    char dir[] = "/tmp/switchyard-c-config-XXXXXX";
    char text[1024], good[512], path[512], url[512];
    sy_store *store = NULL;
    sy_client *client = NULL;
    sy_worker *worker = NULL;
    sy_buf addr = {0}, hosts = {0};
    CHECK(mkdtemp(dir) != NULL);
    snprintf(url, sizeof url, "sqlite:%s/config.db", dir);
    snprintf(text, sizeof text,
             "[store]\nurl = \"%s\"\n\n[host]\nname = \"c-from-config\"\nconcurrency = 3\n"
             "health_listen = \"127.0.0.1:0\"\n",
             url);
    write_file(dir, "switchyard.toml", text, good, sizeof good);

    EXPECT(sy_worker_new_from_config(good, NULL, &err), SY_INVALID_ARGUMENT, "worker is NULL");
    EXPECT(sy_worker_new_from_config(good, &worker, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "noop", NULL, noop, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_start(worker, &err), SY_OK, NULL);
    /* concurrency = 3: the handler's slots. */
    EXPECT(sy_worker_health_addr(worker, &addr, &err), SY_OK, NULL);
    CHECK(http_get((const char *)addr.ptr, "/metrics", page, sizeof page) == 0);
    CHECK(strstr(page, "switchyard_slots_free{handler=\"noop\"} 3") != NULL);
    /* The configured store, with the host under its configured name. */
    EXPECT(sy_store_open(url, &store, &err), SY_OK, NULL);
    EXPECT(sy_client_new(store, &client, &err), SY_OK, NULL);
    EXPECT(sy_client_workers(client, NULL, &err), SY_INVALID_ARGUMENT, "workers is NULL");
    EXPECT(sy_client_workers(client, &hosts, &err), SY_OK, NULL);
    CHECK(strstr((const char *)hosts.ptr, "\"name\":\"c-from-config\"") != NULL);
    CHECK(strstr((const char *)hosts.ptr, "\"noop\"") != NULL);
    sy_buf_free(&hosts);
    sy_buf_free(&addr);
    EXPECT(sy_worker_stop(worker, &err), SY_OK, NULL);
    CHECK(sy_worker_free(worker) == SY_OK);
    worker = NULL;

    /* NULL: the file named by SWITCHYARD_CONFIG, with SWITCHYARD_* overrides. */
    CHECK(setenv("SWITCHYARD_CONFIG", good, 1) == 0);
    CHECK(setenv("SWITCHYARD_HOST__NAME", "c-from-env", 1) == 0);
    EXPECT(sy_worker_new_from_config(NULL, &worker, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "noop", NULL, noop, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_start(worker, &err), SY_OK, NULL);
    EXPECT(sy_client_workers(client, &hosts, &err), SY_OK, NULL);
    CHECK(strstr((const char *)hosts.ptr, "\"name\":\"c-from-env\"") != NULL);
    sy_buf_free(&hosts);
    EXPECT(sy_worker_stop(worker, &err), SY_OK, NULL);
    CHECK(sy_worker_free(worker) == SY_OK);
    worker = NULL;
    CHECK(unsetenv("SWITCHYARD_HOST__NAME") == 0);
    CHECK(unsetenv("SWITCHYARD_CONFIG") == 0);

    /* Unknown keys and wrong types name the key and the file. */
    write_file(dir, "typo.toml", "[host]\nconcurency = 3\n", path, sizeof path);
    EXPECT(sy_worker_new_from_config(path, &worker, &err), SY_CONFIG, "host.concurency");
    CHECK(strstr(last_message, "typo.toml") != NULL);
    CHECK(worker == NULL);
    write_file(dir, "type.toml", "[host]\nconcurrency = \"many\"\n", path, sizeof path);
    EXPECT(sy_worker_new_from_config(path, &worker, &err), SY_CONFIG, "host.concurrency");
    CHECK(strstr(last_message, "type.toml") != NULL);
    CHECK(worker == NULL);
    EXPECT(sy_worker_new_from_config("/nonexistent/switchyard.toml", &worker, &err), SY_CONFIG,
           "/nonexistent/switchyard.toml");

    CHECK(sy_client_free(client) == SY_OK);
    CHECK(sy_store_free(store) == SY_OK);
    DIR *d = opendir(dir);
    CHECK(d != NULL);
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    CHECK(rmdir(dir) == 0);
}

int main(void) {
    sy_store *store = NULL;
    sy_client *client = NULL;
    sy_worker *worker = NULL;
    struct shared sh = {0};
    sy_buf id = {0}, res = {0};
    bool flag = false;
    int bogus = 0;

    /* Errors, buffers, names. */
    CHECK(strcmp(sy_status_name(SY_NOT_FOUND), "SY_NOT_FOUND") == 0);
    CHECK(strcmp(sy_status_name(SY_AWAIT_TIMEOUT), "SY_AWAIT_TIMEOUT") == 0);
    CHECK(strcmp(sy_status_name(SY_TASK_FAILED), "SY_TASK_FAILED") == 0);
    CHECK(strcmp(sy_status_name(SY_TASK_CANCELLED), "SY_TASK_CANCELLED") == 0);
    CHECK(strcmp(sy_status_name(999), "SY_UNKNOWN") == 0);
    CHECK(strcmp(sy_status_name(-1), "SY_UNKNOWN") == 0);
    CHECK(sy_error_detail_json(NULL) == NULL);
    CHECK(strcmp(sy_error_message(NULL), "") == 0);
    CHECK(sy_error_status(NULL) == SY_OK);
    sy_error_free(NULL);
    sy_buf_free(NULL);
    sy_buf_free(&id); /* empty buffer: nothing to do */

    /* Store. */
    EXPECT(sy_store_open(NULL, &store, &err), SY_INVALID_ARGUMENT, "url is NULL");
    EXPECT(sy_store_open("memory", NULL, &err), SY_INVALID_ARGUMENT, "store is NULL");
    EXPECT(sy_store_open("nosuch://x", &store, &err), SY_CONFIG, "");
    CHECK(store == NULL);
    CHECK(sy_store_open("memory", &store, NULL) == SY_OK); /* err may be NULL */
    CHECK(store != NULL);
    CHECK(sy_store_free(NULL) == SY_INVALID_ARGUMENT);
    CHECK(sy_store_free((sy_store *)&bogus) == SY_INVALID_ARGUMENT);

    /* Client. */
    EXPECT(sy_client_new(NULL, &client, &err), SY_INVALID_ARGUMENT, "store is NULL");
    EXPECT(sy_client_new((sy_store *)&bogus, &client, &err), SY_INVALID_ARGUMENT, "not a live handle");
    EXPECT(sy_client_new(store, NULL, &err), SY_INVALID_ARGUMENT, "client is NULL");
    EXPECT(sy_client_new(store, &client, &err), SY_OK, NULL);

    /* Worker. */
    EXPECT(sy_worker_new(store, 0, &worker, &err), SY_INVALID_ARGUMENT, "concurrency");
    EXPECT(sy_worker_new(NULL, 2, &worker, &err), SY_INVALID_ARGUMENT, "store is NULL");
    EXPECT(sy_worker_new(store, 2, &worker, &err), SY_OK, NULL);
    EXPECT(sy_worker_start(worker, &err), SY_CONFLICT, "no handler");
    sh.worker = worker;
    EXPECT(sy_worker_step(worker, "echo", NULL, NULL, NULL, &err), SY_INVALID_ARGUMENT, "callback is NULL");
    EXPECT(sy_worker_step(worker, NULL, NULL, echo, &sh, &err), SY_INVALID_ARGUMENT, "name is NULL");
    EXPECT(sy_worker_step((sy_worker *)&bogus, "echo", NULL, echo, &sh, &err), SY_INVALID_ARGUMENT, "not a live handle");
    EXPECT(sy_worker_step(worker, "echo", NULL, echo, &sh, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "echo", NULL, echo, &sh, &err), SY_INVALID_ARGUMENT, "registered twice");
    EXPECT(sy_worker_step(worker, "boom", NULL, boom, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "garbage", NULL, garbage, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "twice", NULL, twice, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "slow", NULL, slow, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_start(worker, &err), SY_OK, NULL);
    EXPECT(sy_worker_start(worker, &err), SY_CONFLICT, "already started");
    EXPECT(sy_worker_step(worker, "late", NULL, echo, NULL, &err), SY_CONFLICT, "before the worker starts");

    /* Spawn and result. */
    EXPECT(sy_client_spawn(client, "echo", "{bad json", &id, &err), SY_INVALID_ARGUMENT, "not valid JSON");
    CHECK(id.ptr == NULL);
    EXPECT(sy_client_spawn(client, NULL, "1", &id, &err), SY_INVALID_ARGUMENT, "handler is NULL");
    EXPECT(sy_client_spawn(client, "echo", NULL, &id, &err), SY_INVALID_ARGUMENT, "input_json is NULL");
    EXPECT(sy_client_spawn(client, "echo", "1", NULL, &err), SY_INVALID_ARGUMENT, "task_id is NULL");
    EXPECT(sy_client_spawn(NULL, "echo", "1", &id, &err), SY_INVALID_ARGUMENT, "client is NULL");
    EXPECT(sy_client_spawn(client, "echo", "{\"n\":[1,2,3]}", &id, &err), SY_OK, NULL);
    CHECK(id.ptr != NULL && id.len == 36 && id.ptr[36] == 0);
    EXPECT(sy_client_result(client, (const char *)id.ptr, 30000, &res, &err), SY_OK, NULL);
    CHECK(strcmp((const char *)res.ptr, "{\"n\":[1,2,3]}") == 0);
    CHECK(sh.stop_from_callback == SY_CONFLICT);
    sy_buf_free(&res);
    sy_buf_free(&res); /* emptied: a second free does nothing */
    sy_buf_free(&id);

    EXPECT(sy_client_result(client, "not-a-uuid", 10, &res, &err), SY_INVALID_ARGUMENT, "not-a-uuid");
    EXPECT(sy_client_result(client, "01a208c8-9154-723f-b462-c8823cc81823", 10, &res, &err), SY_NOT_FOUND, "");
    EXPECT(sy_client_result(client, NULL, 10, &res, &err), SY_INVALID_ARGUMENT, "task_id is NULL");
    EXPECT(sy_client_result(client, "x", 10, NULL, &err), SY_INVALID_ARGUMENT, "result is NULL");

    /* A handler nobody serves: the wait times out. */
    EXPECT(sy_client_spawn(client, "nobody", "null", &id, &err), SY_OK, NULL);
    EXPECT(sy_client_result(client, (const char *)id.ptr, 50, &res, &err), SY_TIMEOUT, "");
    EXPECT(sy_client_cancel(client, (const char *)id.ptr, false, &flag, &err), SY_OK, NULL);
    CHECK(flag);
    EXPECT(sy_client_cancel(client, (const char *)id.ptr, true, &flag, &err), SY_OK, NULL);
    CHECK(!flag);
    EXPECT(sy_client_result(client, (const char *)id.ptr, 1000, &res, &err), SY_TASK_CANCELLED, "cancelled");
    {
        /* The details: which task. */
        sy_error *err = NULL;
        CHECK(sy_client_result(client, (const char *)id.ptr, 1000, &res, &err) == SY_TASK_CANCELLED);
        const char *d = sy_error_detail_json(err);
        char want[64];
        snprintf(want, sizeof want, "\"task_id\":\"%s\"", (const char *)id.ptr);
        CHECK(d != NULL && strstr(d, want) != NULL && strstr(d, "\"kind\":\"cancelled\"") != NULL);
        printf("ok: SY_TASK_CANCELLED: %s\n", d);
        sy_error_free(err);
    }
    sy_buf_free(&id);
    EXPECT(sy_client_cancel(client, "nope", false, &flag, &err), SY_INVALID_ARGUMENT, "nope");
    EXPECT(sy_client_cancel(NULL, "nope", false, &flag, &err), SY_INVALID_ARGUMENT, "client is NULL");

    /* Failures reported by callbacks. */
    EXPECT(sy_client_spawn(client, "boom", "{}", &id, &err), SY_OK, NULL);
    EXPECT(sy_client_result(client, (const char *)id.ptr, 30000, &res, &err), SY_TASK_FAILED, "out of widgets");
    {
        /* The details: the task, and its error as recorded. */
        sy_error *err = NULL;
        CHECK(sy_client_result(client, (const char *)id.ptr, 30000, &res, &err) == SY_TASK_FAILED);
        const char *d = sy_error_detail_json(err);
        char want[64];
        snprintf(want, sizeof want, "\"task_id\":\"%s\"", (const char *)id.ptr);
        CHECK(d != NULL && strstr(d, want) != NULL);
        CHECK(strstr(d, "\"kind\":\"permanent\"") != NULL);
        CHECK(strstr(d, "\"message\":\"boom: out of widgets\"") != NULL);
        CHECK(strstr(d, "\"traceback\":null") != NULL);
        CHECK(strstr(d, "\"attempt\":1") != NULL);
        printf("ok: SY_TASK_FAILED: %s: %s\n", sy_error_message(err), d);
        sy_error_free(err);
    }
    sy_buf_free(&id);
    EXPECT(sy_client_spawn(client, "garbage", "{}", &id, &err), SY_OK, NULL);
    EXPECT(sy_client_result(client, (const char *)id.ptr, 30000, &res, &err), SY_TASK_FAILED, "not valid JSON");
    sy_buf_free(&id);

    /* Checkpoints survive a retry. */
    EXPECT(sy_client_spawn(client, "twice", "{}", &id, &err), SY_OK, NULL);
    EXPECT(sy_client_result(client, (const char *)id.ptr, 60000, &res, &err), SY_OK, NULL);
    CHECK(strcmp((const char *)res.ptr, "{\"charged\":42}") == 0);
    sy_buf_free(&res);
    sy_buf_free(&id);

    /* Cancelling a running step: the callback sees it. */
    EXPECT(sy_client_spawn(client, "slow", "{}", &id, &err), SY_OK, NULL);
    sleep_ms(300);
    EXPECT(sy_client_cancel(client, (const char *)id.ptr, false, NULL, &err), SY_OK, NULL);
    EXPECT(sy_client_result(client, (const char *)id.ptr, 30000, &res, &err), SY_TASK_CANCELLED, "cancelled");
    sy_buf_free(&id);
    for (int i = 0; i < 300 && !__atomic_load_n(&slow_saw_cancel, __ATOMIC_SEQ_CST); i++) sleep_ms(10);
    CHECK(__atomic_load_n(&slow_saw_cancel, __ATOMIC_SEQ_CST) == 1);
    printf("ok: a cancelled callback sees sy_ctx_is_cancelled\n");

    /* Events from a client: first write wins. */
    EXPECT(sy_client_emit(client, "order.paid", "{\"amount\":3}", &flag, &err), SY_OK, NULL);
    CHECK(flag);
    EXPECT(sy_client_emit(client, "order.paid", "{\"amount\":4}", &flag, &err), SY_OK, NULL);
    CHECK(!flag);
    EXPECT(sy_client_emit(client, "echo.seen", "null", &flag, &err), SY_OK, NULL);
    CHECK(!flag); /* emitted by the echo callback */
    EXPECT(sy_client_emit(client, "echo.alias", "null", &flag, &err), SY_OK, NULL);
    CHECK(!flag); /* emitted by the echo callback, through sy_ctx_emit */
    EXPECT(sy_client_emit(client, "e", "nope", &flag, &err), SY_INVALID_ARGUMENT, "not valid JSON");
    EXPECT(sy_client_emit(client, NULL, "1", &flag, &err), SY_INVALID_ARGUMENT, "name is NULL");

    /* Context functions outside a callback. */
    CHECK(!sy_ctx_is_cancelled(NULL));
    EXPECT(sy_ctx_set_output(NULL, "1", 1, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_task_id((sy_ctx *)&bogus, &id, &err), SY_INVALID_ARGUMENT, "not a live handle");
    EXPECT(sy_ctx_emit_event(NULL, "e", "1", NULL, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_emit(NULL, "e", "1", NULL, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_checkpoint_get(NULL, "c", &res, &flag, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_checkpoint_put(NULL, "c", "1", &err), SY_INVALID_ARGUMENT, "ctx is NULL");

    durable_checks();
    stop_checks();
    idle_checks();
    health_checks();
    config_checks();

    /* Stop, double stop, frees, double frees. */
    EXPECT(sy_worker_stop(worker, &err), SY_OK, NULL);
    EXPECT(sy_worker_stop(worker, &err), SY_OK, NULL);
    EXPECT(sy_worker_start(worker, &err), SY_CONFLICT, "already started");
    EXPECT(sy_worker_stop(NULL, &err), SY_INVALID_ARGUMENT, "worker is NULL");
    CHECK(sy_worker_free(worker) == SY_OK);
    CHECK(sy_worker_free(worker) == SY_INVALID_ARGUMENT);
    CHECK(sy_client_free(client) == SY_OK);
    CHECK(sy_client_free(client) == SY_INVALID_ARGUMENT);
    EXPECT(sy_client_spawn(client, "echo", "1", &id, &err), SY_INVALID_ARGUMENT, "not a live handle");
    CHECK(sy_store_free(store) == SY_OK);
    CHECK(sy_store_free(store) == SY_INVALID_ARGUMENT);

    printf("c_api: %d checks passed\n", checks);
    return 0;
}
