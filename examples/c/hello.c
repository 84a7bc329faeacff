/* A C host for switchyard: registers a `greet` step handler, spawns a task
 * on it from a client and prints the result.
 *
 *   cargo build --release -p switchyard-c
 *   gcc -Iinclude examples/c/hello.c -L$CARGO_TARGET_DIR/release -lswitchyard -o hello
 *   LD_LIBRARY_PATH=$CARGO_TARGET_DIR/release ./hello [store-url]
 */
#include <stdio.h>
#include <string.h>

#include "switchyard.h"

static int fail(const char *what, sy_status st, sy_error *err) {
    fprintf(stderr, "%s: %s: %s\n", what, sy_status_name(st), sy_error_message(err));
    sy_error_free(err);
    return 1;
}

/* Runs on a library-owned thread. `input` is {"name": "..."}. */
static int32_t greet(const char *input, size_t input_len, sy_ctx *ctx, void *user_data) {
    const char *greeting = user_data;
    (void)input_len;
    /* Crude extraction, enough for the example: the value of "name". */
    const char *p = strstr(input, "\"name\"");
    char name[64] = "world";
    if (p && (p = strchr(p + 6, '"')) != NULL) {
        size_t n = strcspn(p + 1, "\"");
        if (n >= sizeof name) n = sizeof name - 1;
        memcpy(name, p + 1, n);
        name[n] = 0;
    }
    char out[160];
    int n = snprintf(out, sizeof out, "{\"greeting\":\"%s, %s!\"}", greeting, name);
    sy_ctx_set_output(ctx, out, (size_t)n, NULL);
    return SY_OK;
}

int main(int argc, char **argv) {
    const char *url = argc > 1 ? argv[1] : "memory";
    sy_error *err = NULL;
    sy_store *store = NULL;
    sy_client *client = NULL;
    sy_worker *worker = NULL;
    sy_status st;

    if ((st = sy_store_open(url, &store, &err)) != SY_OK) return fail("open", st, err);
    if ((st = sy_worker_new(store, 2, &worker, &err)) != SY_OK) return fail("worker", st, err);
    if ((st = sy_worker_step(worker, "greet", NULL, greet, (void *)"Hello", &err)) != SY_OK)
        return fail("register", st, err);
    if ((st = sy_worker_start(worker, &err)) != SY_OK) return fail("start", st, err);
    if ((st = sy_client_new(store, &client, &err)) != SY_OK) return fail("client", st, err);

    sy_buf id = {0}, result = {0};
    if ((st = sy_client_spawn(client, "greet", "{\"name\":\"C\"}", &id, &err)) != SY_OK)
        return fail("spawn", st, err);
    if ((st = sy_client_result(client, (const char *)id.ptr, 10000, &result, &err)) != SY_OK)
        return fail("result", st, err);
    printf("task %s -> %s\n", (const char *)id.ptr, (const char *)result.ptr);

    sy_buf_free(&id);
    sy_buf_free(&result);
    sy_client_free(client);
    sy_worker_free(worker);
    sy_store_free(store);
    return 0;
}
