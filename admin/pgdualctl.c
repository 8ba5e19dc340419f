/*
 * pgdualctl — the operator's command line, a thin client over pgdual's admin socket:
 * one command line out, one JSON reply back. Prints the reply for people, or as is with
 * --json. Exit codes: 0 success, 1 the command was refused or failed, 2 usage or
 * connection errors.
 */
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define REPLY_MAX (16 * 1024 * 1024)

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: pgdualctl [-s SOCKET] [--json] COMMAND [ARGS]\n"
            "\n"
            "The admin socket is -s SOCKET, else $PGDUAL_ADMIN.\n"
            "Commands: status, sessions, rules, flag RULE reads=V|writes=V,\n"
            "          divergence [RULE] [--limit N], verify RULE [--repair],\n"
            "          backfill RULE [--batch N], jobs, pause DB, resume DB,\n"
            "          switchover DB [--timeout MS] [--force], rollback DB, reload\n");
}

static int connect_admin(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "pgdualctl: admin socket path is too long: %s\n", path);
        return -1;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        fprintf(stderr,
                "pgdualctl: could not connect to the admin socket \"%s\": %s\n"
                "HINT:  Is pgdual running with admin.socket set to this path? Pass it with -s "
                "or $PGDUAL_ADMIN.\n",
                path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

static int send_all(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, buf, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Reads one reply line; returns a malloc'd NUL-terminated string or NULL. */
static char *read_line(int fd)
{
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    while (buf != NULL) {
        if (len + 1 >= cap) {
            if (cap >= REPLY_MAX)
                break;
            char *nbuf = realloc(buf, cap * 2);
            if (nbuf == NULL)
                break;
            buf = nbuf;
            cap *= 2;
        }
        ssize_t r = recv(fd, buf + len, cap - len - 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
        buf[len] = '\0';
        char *nl = memchr(buf, '\n', len);
        if (nl != NULL) {
            *nl = '\0';
            return buf;
        }
    }
    free(buf);
    return NULL;
}

/* A scalar as text, for tables and "key: value" lines. */
static char *scalar_text(json_t *v)
{
    if (json_is_string(v))
        return strdup(json_string_value(v));
    if (json_is_null(v) || v == NULL)
        return strdup("");
    return json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
}

/* An array of objects as an aligned table, columns in the order of the first object. */
static void print_table(json_t *rows)
{
    json_t *first = json_array_get(rows, 0);
    size_t ncols = json_object_size(first);
    if (ncols == 0 || ncols > 32)
        return;
    const char *names[32];
    size_t width[32];
    size_t c = 0;
    const char *key;
    json_t *value;
    json_object_foreach(first, key, value)
    {
        names[c] = key;
        width[c] = strlen(key);
        c++;
    }
    size_t i;
    json_t *row;
    json_array_foreach(rows, i, row)
    {
        for (c = 0; c < ncols; c++) {
            char *t = scalar_text(json_object_get(row, names[c]));
            if (t != NULL && strlen(t) > width[c])
                width[c] = strlen(t);
            free(t);
        }
    }
    for (c = 0; c < ncols; c++)
        printf("%-*s%s", (int)width[c], names[c], c + 1 < ncols ? " | " : "\n");
    for (c = 0; c < ncols; c++) {
        for (size_t k = 0; k < width[c]; k++)
            putchar('-');
        printf("%s", c + 1 < ncols ? "-+-" : "\n");
    }
    json_array_foreach(rows, i, row)
    {
        for (c = 0; c < ncols; c++) {
            char *t = scalar_text(json_object_get(row, names[c]));
            printf("%-*s%s", (int)width[c], t ? t : "", c + 1 < ncols ? " | " : "\n");
            free(t);
        }
    }
    printf("(%zu %s)\n", json_array_size(rows), json_array_size(rows) == 1 ? "row" : "rows");
}

/* People's form of a reply: "key: value" lines; arrays of objects as tables. */
static void print_human(json_t *reply)
{
    const char *key;
    json_t *value;
    json_object_foreach(reply, key, value)
    {
        if (strcmp(key, "ok") == 0)
            continue;
        if (json_is_array(value) && json_array_size(value) > 0 &&
            json_is_object(json_array_get(value, 0))) {
            printf("%s:\n", key);
            print_table(value);
            continue;
        }
        if (json_is_object(value)) {
            const char *k2;
            json_t *v2;
            printf("%s:\n", key);
            json_object_foreach(value, k2, v2)
            {
                char *t = scalar_text(v2);
                printf("  %s: %s\n", k2, t ? t : "");
                free(t);
            }
            continue;
        }
        char *t = scalar_text(value);
        printf("%s: %s\n", key, t ? t : "");
        free(t);
    }
}

int main(int argc, char **argv)
{
    const char *sock = getenv("PGDUAL_ADMIN");
    bool as_json = false;
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "-s") == 0 && i + 1 < argc) {
            sock = argv[++i];
        } else if (strcmp(argv[i], "--json") == 0) {
            as_json = true;
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "pgdualctl: unknown option \"%s\"\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    if (i >= argc) {
        usage(stderr);
        return 2;
    }
    if (sock == NULL) {
        fprintf(stderr, "pgdualctl: no admin socket given\n"
                        "HINT:  Pass -s PATH or set PGDUAL_ADMIN to pgdual's admin.socket.\n");
        return 2;
    }
    /* The command line goes out as the words given, space-separated, one line. */
    size_t len = 0;
    for (int j = i; j < argc; j++)
        len += strlen(argv[j]) + 1;
    char *line = malloc(len + 1);
    if (line == NULL)
        return 2;
    line[0] = '\0';
    for (int j = i; j < argc; j++) {
        if (strchr(argv[j], '\n') != NULL) {
            fprintf(stderr, "pgdualctl: arguments cannot contain newlines\n");
            free(line);
            return 2;
        }
        strcat(line, argv[j]);
        strcat(line, j + 1 < argc ? " " : "\n");
    }
    int fd = connect_admin(sock);
    if (fd < 0) {
        free(line);
        return 2;
    }
    char *reply_text = NULL;
    if (send_all(fd, line, strlen(line)) == 0)
        reply_text = read_line(fd);
    close(fd);
    free(line);
    if (reply_text == NULL) {
        fprintf(stderr, "pgdualctl: no reply from pgdual on \"%s\"\n", sock);
        return 2;
    }
    json_error_t jerr;
    json_t *reply = json_loads(reply_text, 0, &jerr);
    if (reply == NULL || !json_is_object(reply)) {
        fprintf(stderr, "pgdualctl: pgdual sent a reply that is not a JSON object: %s\n",
                jerr.text);
        free(reply_text);
        json_decref(reply);
        return 2;
    }
    bool ok = json_is_true(json_object_get(reply, "ok"));
    if (as_json) {
        printf("%s\n", reply_text);
    } else if (!ok) {
        json_t *err = json_object_get(reply, "error");
        json_t *hint = json_object_get(reply, "hint");
        json_t *errors = json_object_get(reply, "errors");
        fprintf(stderr, "pgdualctl: %s\n", json_is_string(err) ? json_string_value(err)
                                                               : "the command failed");
        size_t k;
        json_t *e;
        json_array_foreach(errors, k, e) fprintf(stderr, "  %s\n", json_string_value(e));
        if (json_is_string(hint))
            fprintf(stderr, "HINT:  %s\n", json_string_value(hint));
    } else {
        print_human(reply);
    }
    free(reply_text);
    json_decref(reply);
    return ok ? 0 : 1;
}
