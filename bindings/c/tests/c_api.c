/* Exercises every function of include/switchyard.h, errors included.
 * Run by `make test-c` under valgrind (no leaks, no invalid accesses).
 * Prints one line per check; exits 1 on the first failed check. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

/* Echoes its input after exercising the context. */
static int32_t echo(const char *input, size_t len, sy_ctx *ctx, void *user_data) {
    struct shared *sh = user_data;
    sy_error *err = NULL;
    if (sy_ctx_is_cancelled(ctx)) return SY_ERROR_RETRYABLE;
    sy_buf id = {0};
    if (sy_ctx_task_id(ctx, &id, &err) != SY_OK || id.len != 36) return SY_ERROR_PERMANENT;
    sy_buf_free(&id);
    bool stored = false;
    if (sy_ctx_emit(ctx, "echo.seen", "{\"ok\":true}", &stored, &err) != SY_OK) {
        sy_ctx_set_output(ctx, sy_error_message(err), strlen(sy_error_message(err)), NULL);
        sy_error_free(err);
        return SY_ERROR_PERMANENT;
    }
    /* Errors inside a callback: invalid JSON, NULL name. */
    if (sy_ctx_emit(ctx, "x", "{bad", NULL, &err) != SY_INVALID_ARGUMENT) return SY_ERROR_PERMANENT;
    sy_error_free(err);
    if (sy_ctx_emit(ctx, NULL, "1", NULL, &err) != SY_INVALID_ARGUMENT) return SY_ERROR_PERMANENT;
    sy_error_free(err);
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

/* Runs until cancelled. */
static int32_t slow(const char *input, size_t len, sy_ctx *ctx, void *user_data) {
    (void)input, (void)len, (void)user_data;
    for (int i = 0; i < 3000 && !sy_ctx_is_cancelled(ctx); i++) sleep_ms(10);
    return SY_ERROR_RETRYABLE;
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
    EXPECT(sy_worker_step(worker, "echo", NULL, NULL, &err), SY_INVALID_ARGUMENT, "callback is NULL");
    EXPECT(sy_worker_step(worker, NULL, echo, &sh, &err), SY_INVALID_ARGUMENT, "name is NULL");
    EXPECT(sy_worker_step((sy_worker *)&bogus, "echo", echo, &sh, &err), SY_INVALID_ARGUMENT, "not a live handle");
    EXPECT(sy_worker_step(worker, "echo", echo, &sh, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "echo", echo, &sh, &err), SY_INVALID_ARGUMENT, "registered twice");
    EXPECT(sy_worker_step(worker, "boom", boom, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "garbage", garbage, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "twice", twice, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_step(worker, "slow", slow, NULL, &err), SY_OK, NULL);
    EXPECT(sy_worker_start(worker, &err), SY_OK, NULL);
    EXPECT(sy_worker_start(worker, &err), SY_CONFLICT, "already started");
    EXPECT(sy_worker_step(worker, "late", echo, NULL, &err), SY_CONFLICT, "before the worker starts");

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
    EXPECT(sy_client_result(client, (const char *)id.ptr, 1000, &res, &err), SY_CONFLICT, "cancelled");
    sy_buf_free(&id);
    EXPECT(sy_client_cancel(client, "nope", false, &flag, &err), SY_INVALID_ARGUMENT, "nope");
    EXPECT(sy_client_cancel(NULL, "nope", false, &flag, &err), SY_INVALID_ARGUMENT, "client is NULL");

    /* Failures reported by callbacks. */
    EXPECT(sy_client_spawn(client, "boom", "{}", &id, &err), SY_OK, NULL);
    EXPECT(sy_client_result(client, (const char *)id.ptr, 30000, &res, &err), SY_CONFLICT, "out of widgets");
    sy_buf_free(&id);
    EXPECT(sy_client_spawn(client, "garbage", "{}", &id, &err), SY_OK, NULL);
    EXPECT(sy_client_result(client, (const char *)id.ptr, 30000, &res, &err), SY_CONFLICT, "invalid JSON");
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
    EXPECT(sy_client_result(client, (const char *)id.ptr, 30000, &res, &err), SY_CONFLICT, "cancelled");
    sy_buf_free(&id);

    /* Events from a client: first write wins. */
    EXPECT(sy_client_emit(client, "order.paid", "{\"amount\":3}", &flag, &err), SY_OK, NULL);
    CHECK(flag);
    EXPECT(sy_client_emit(client, "order.paid", "{\"amount\":4}", &flag, &err), SY_OK, NULL);
    CHECK(!flag);
    EXPECT(sy_client_emit(client, "echo.seen", "null", &flag, &err), SY_OK, NULL);
    CHECK(!flag); /* emitted by the echo callback */
    EXPECT(sy_client_emit(client, "e", "nope", &flag, &err), SY_INVALID_ARGUMENT, "not valid JSON");
    EXPECT(sy_client_emit(client, NULL, "1", &flag, &err), SY_INVALID_ARGUMENT, "name is NULL");

    /* Context functions outside a callback. */
    CHECK(!sy_ctx_is_cancelled(NULL));
    EXPECT(sy_ctx_set_output(NULL, "1", 1, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_task_id((sy_ctx *)&bogus, &id, &err), SY_INVALID_ARGUMENT, "not a live handle");
    EXPECT(sy_ctx_emit(NULL, "e", "1", NULL, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_checkpoint_get(NULL, "c", &res, &flag, &err), SY_INVALID_ARGUMENT, "ctx is NULL");
    EXPECT(sy_ctx_checkpoint_put(NULL, "c", "1", &err), SY_INVALID_ARGUMENT, "ctx is NULL");

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
