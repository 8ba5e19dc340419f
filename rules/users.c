/*
 * users.c — owns the users file that `auth.mode: scram` checks clients against, in
 * pgbouncer's auth_file format: one `"name" "secret"` line per user. It parses the file,
 * finds users by name, and wipes every copy of a secret it made once done with it.
 *
 * Secrets never reach an error message: messages name the file and the line, and the user
 * only for a well-formed line (in a malformed one, what looks like the name may well hold
 * the secret, as in `"alice""secret"`).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "rules/config.h"

#define SCRAM_PREFIX   "SCRAM-SHA-256$"
#define USERS_FILE_MAX (64 * 1024 * 1024)

static void wipe_free(char *s)
{
    if (s == NULL)
        return;
    explicit_bzero(s, strlen(s));
    free(s);
}

static void push_error(pd_config_errors_t *errs, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void push_error(pd_config_errors_t *errs, const char *fmt, ...)
{
    char *msg = NULL;
    va_list ap;

    if (errs == NULL)
        return;
    va_start(ap, fmt);
    int n = vasprintf(&msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    char **m = realloc(errs->msgs, (errs->count + 1) * sizeof *m);
    if (m == NULL) {
        free(msg);
        return;
    }
    m[errs->count++] = msg;
    errs->msgs = m;
}

/*
 * Reads one double-quoted field at *p, where "" stands for a literal quote. Returns the
 * text (malloc'd) and advances *p past the closing quote; NULL with *bad set when there is
 * no opening quote ("missing") or no closing one ("unterminated").
 */
static char *read_quoted(const char **p, const char **bad)
{
    const char *s = *p;
    char *out;
    size_t n = 0;

    if (*s != '"') {
        *bad = "missing";
        return NULL;
    }
    s++;
    out = malloc(strlen(s) + 1);
    if (out == NULL) {
        *bad = "out of memory for";
        return NULL;
    }
    for (;;) {
        if (*s == '\0') {
            out[n] = '\0';
            wipe_free(out);
            *bad = "unterminated";
            return NULL;
        }
        if (*s == '"' && s[1] != '"')
            break;
        s += *s == '"' ? 1 : 0; /* the first of "" */
        out[n++] = *s++;
    }
    out[n] = '\0';
    *p = s + 1;
    return out;
}

static const char *skip_blank(const char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    return s;
}

typedef struct {
    const char *path;
    unsigned lineno;
    pd_config_errors_t *errs;
    bool failed;
} users_ctx_t;

static void line_error(users_ctx_t *c, const char *what, const char *user)
{
    c->failed = true;
    if (user != NULL)
        push_error(c->errs, "%s:%u: %s for user \"%s\"", c->path, c->lineno, what, user);
    else
        push_error(c->errs, "%s:%u: %s", c->path, c->lineno, what);
}

/* Parses a line; true with *name and *secret set for a user, true with both NULL for a
   line to ignore, false after reporting a malformed line. */
static bool parse_line(users_ctx_t *c, const char *line, char **name, char **secret)
{
    const char *p = skip_blank(line), *bad = NULL;
    char msg[64];

    *name = *secret = NULL;
    if (*p == '\0' || *p == ';' || *p == '#')
        return true;
    *name = read_quoted(&p, &bad);
    if (*name == NULL) {
        snprintf(msg, sizeof msg, "%s quoted user name", bad);
        line_error(c, msg, NULL);
        return false;
    }
    if (*p == '\0') {
        line_error(c, "missing quoted secret", NULL);
        goto fail;
    }
    if (*p != ' ' && *p != '\t') {
        line_error(c, "expected blank space after the user name", NULL);
        goto fail;
    }
    p = skip_blank(p);
    *secret = read_quoted(&p, &bad);
    if (*secret == NULL) {
        snprintf(msg, sizeof msg, "%s quoted secret", bad);
        line_error(c, msg, NULL);
        goto fail;
    }
    /* Like pgbouncer, text after the second field (separated by blanks) is ignored. */
    if (*p != '\0' && *p != ' ' && *p != '\t') {
        line_error(c, "unexpected text right after the secret", NULL);
        goto fail;
    }
    if ((*name)[0] == '\0' || (*secret)[0] == '\0') {
        line_error(c, (*name)[0] == '\0' ? "empty user name" : "empty secret", NULL);
        goto fail;
    }
    return true;
fail:
    wipe_free(*name); /* in a malformed line the "name" may hold the secret */
    wipe_free(*secret);
    *name = *secret = NULL;
    return false;
}

static bool add_user(pd_users_t *u, char *name, char *secret)
{
    pd_user_t *grown = realloc(u->users, (u->count + 1) * sizeof *grown);
    if (grown == NULL)
        return false;
    u->users = grown;
    u->users[u->count++] = (pd_user_t){
        .name = name,
        .secret = secret,
        .is_scram = strncmp(secret, SCRAM_PREFIX, strlen(SCRAM_PREFIX)) == 0,
    };
    return true;
}

/* Handles one line of the file, without its newline. */
static void take_line(users_ctx_t *c, pd_users_t *u, char *line, size_t len)
{
    char *name, *secret;

    if (memchr(line, '\0', len) != NULL) {
        line_error(c, "line contains a NUL byte", NULL);
        return;
    }
    line[len] = '\0';
    if (len > 0 && line[len - 1] == '\r')
        line[--len] = '\0';
    if (!parse_line(c, line, &name, &secret) || name == NULL)
        return;
    if (pd_users_find(u, name) != NULL)
        line_error(c, "duplicate entry", name);
    else if (!add_user(u, name, secret))
        line_error(c, "out of memory", NULL);
    else
        return;
    free(name);
    wipe_free(secret);
}

/*
 * Reads the whole file into one buffer of its exact size, so that no copy of a secret is
 * left behind by stdio buffers or a growing reallocation; the caller wipes the buffer.
 */
static char *read_all(const char *path, size_t *len, pd_config_errors_t *errs)
{
    struct stat st;
    char *buf;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0) {
        push_error(errs, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > USERS_FILE_MAX) {
        push_error(errs, "%s: not a regular file of at most 64 MiB", path);
        close(fd);
        return NULL;
    }
    buf = malloc((size_t)st.st_size + 1);
    if (buf == NULL) {
        push_error(errs, "%s: out of memory", path);
        close(fd);
        return NULL;
    }
    *len = 0;
    while (*len < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + *len, (size_t)st.st_size - *len);
        if (n == 0)
            break; /* the file shrank meanwhile: use what is there */
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            push_error(errs, "%s: read error: %s", path, strerror(errno));
            explicit_bzero(buf, *len);
            free(buf);
            close(fd);
            return NULL;
        }
        *len += (size_t)n;
    }
    close(fd);
    return buf;
}

pd_users_t *pd_users_load(const char *path, pd_config_errors_t *errs)
{
    users_ctx_t c = {.path = path, .errs = errs};
    size_t len = 0;
    char *buf = read_all(path, &len, errs);
    pd_users_t *u;

    if (buf == NULL)
        return NULL;
    u = calloc(1, sizeof *u);
    if (u == NULL) {
        push_error(errs, "%s: out of memory", path);
        explicit_bzero(buf, len);
        free(buf);
        return NULL;
    }
    for (size_t pos = 0; pos < len;) {
        char *nl = memchr(buf + pos, '\n', len - pos);
        size_t line_len = nl != NULL ? (size_t)(nl - (buf + pos)) : len - pos;
        c.lineno++;
        take_line(&c, u, buf + pos, line_len);
        pos += line_len + 1;
    }
    explicit_bzero(buf, len + 1);
    free(buf);
    if (c.failed) {
        pd_users_free(u);
        return NULL;
    }
    return u;
}

const pd_user_t *pd_users_find(const pd_users_t *users, const char *name)
{
    if (users == NULL || name == NULL)
        return NULL;
    for (size_t i = 0; i < users->count; i++)
        if (strcmp(users->users[i].name, name) == 0)
            return &users->users[i];
    return NULL;
}

void pd_users_free(pd_users_t *users)
{
    if (users == NULL)
        return;
    for (size_t i = 0; i < users->count; i++) {
        free(users->users[i].name);
        wipe_free(users->users[i].secret);
    }
    free(users->users);
    free(users);
}
