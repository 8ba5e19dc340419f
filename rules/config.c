/*
 * config.c — owns pgdual's configuration file: the libcyaml schema that describes it, the
 * checks that report every fault with file:line:column, and the conversion of libcyaml's
 * typed result into the pd_config_t of config.h.
 *
 * Why two passes over the file: libcyaml stops at the first fault and its messages carry
 * no positions. So the file is first composed with libyaml into a node tree (every node
 * keeps its start mark) and that tree is walked against the very same libcyaml schema
 * tables, collecting all faults with their positions; cross-field rules (duplicates,
 * references between rules and databases, tls/auth combinations) are checked on the same
 * tree. Only a file without faults is then loaded by libcyaml into typed structs, which
 * are moved into a pd_config_t with defaults applied and paths resolved.
 */
#include "rules/config.h"

#include <cyaml/cyaml.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#include "protocol/wire.h"

#define CFG_STR_MAX              65535u              /* longest string value accepted */
#define CFG_FILE_MAX             (16u * 1024 * 1024) /* a config file larger than this is a mistake */
#define CFG_MAX_FIELDS           32u                 /* no mapping of the schema has more keys */
#define DEFAULT_HOST             "127.0.0.1"
#define DEFAULT_PORT             6432u
#define DEFAULT_SAMPLE           0.1
#define DEFAULT_SHADOW_BUDGET_MS 1000
#define DEFAULT_CLIENTS          1000u
#define DEFAULT_STARTUP          60000u
#define DEFAULT_GRACE            30000u
#define DEFAULT_RELAY_THREADS    1u
#define PD_MAX_RELAY_THREADS     64u
#define MIN_MESSAGE_SIZE         1024u
#define MAX_CLIENTS_LIMIT        1000000u
#define MAX_REPORTED             100u /* errors listed before "N more" */

/* ---------------------------------------------------------------------------------------
 * The file's shape, as libcyaml fills it. Optional values whose default is not zero are
 * pointers, so that "absent" and "explicitly 0" differ. Where a public struct already has
 * the file's shape (a database, a column map) libcyaml fills it directly.
 */
typedef struct {
    char *host;
    uint32_t *port;
} raw_listen_t;

typedef struct {
    char *cert;
    char *key;
    pd_tls_mode_t *mode;
} raw_tls_t;

typedef struct {
    pd_auth_mode_t mode;
    char *users_file;
} raw_auth_t;

typedef struct {
    char *socket;
    char *metrics;
} raw_admin_t;

typedef struct {
    char *postgres;
} raw_state_pg_t;

typedef struct {
    char *log;
    double *shadow_sample;
    uint32_t *shadow_budget_ms;
} raw_divergence_t;

typedef struct {
    uint32_t *max_clients;
    uint64_t *max_message_size;
    uint32_t *startup_timeout_ms;
    uint32_t *shutdown_grace_ms;
    uint32_t *relay_threads;
} raw_limits_t;

typedef struct {
    pd_log_level_t *level;
} raw_log_t;

typedef struct {
    pd_mirror_commit_t commit;
    pd_on_failure_t on_failure;
} raw_mirror_t;

typedef struct {
    char *name;
    char *database;
    pd_rule_kind_t kind;
    char *table;
    char **key;
    unsigned key_count;
    pd_column_map_t *columns;
    unsigned columns_count;
    char **tables;
    unsigned tables_count;
    pd_writes_t writes;
    char *reads;
    raw_mirror_t *mirror;
} raw_rule_t;

typedef struct {
    raw_listen_t *listen;
    raw_tls_t *tls;
    raw_auth_t *auth;
    raw_admin_t *admin;
    char *state;              /* `state: PATH` or `state: postgres` */
    raw_state_pg_t *state_pg; /* `state: { postgres: CONNINFO }` */
    raw_divergence_t *divergence;
    raw_limits_t *limits;
    raw_log_t *log;
    pd_database_cfg_t *databases;
    unsigned databases_count;
    raw_rule_t *rules;
    unsigned rules_count;
} raw_config_t;

/* ---------------------------------------------------------------------------------------
 * Enumerations: one table each, used by libcyaml, by the messages listing valid values and
 * by pd_writes_parse/pd_writes_name, so that the spellings live in one place.
 */
static const cyaml_strval_t tls_mode_strings[] = {
    {"disable", PD_TLS_DISABLE},
    {"allow", PD_TLS_ALLOW},
    {"require", PD_TLS_REQUIRE},
};
static const cyaml_strval_t auth_mode_strings[] = {
    {"trust", PD_AUTH_TRUST},
    {"scram", PD_AUTH_SCRAM},
};
static const cyaml_strval_t kind_strings[] = {
    {"columns", PD_RULE_COLUMNS},
    {"tables", PD_RULE_TABLES},
};
static const cyaml_strval_t writes_strings[] = {
    {"old", PD_WRITES_OLD},
    {"dual", PD_WRITES_DUAL},
    {"dual-new", PD_WRITES_DUAL_NEW},
    {"new", PD_WRITES_NEW},
};
static const cyaml_strval_t commit_strings[] = {
    {"async", PD_COMMIT_ASYNC},
    {"lockstep", PD_COMMIT_LOCKSTEP},
};
static const cyaml_strval_t on_failure_strings[] = {
    {"record", PD_ON_FAILURE_RECORD},
    {"fail", PD_ON_FAILURE_FAIL},
};
static const cyaml_strval_t log_level_strings[] = {
    {"error", PD_LOG_ERROR},
    {"warning", PD_LOG_WARNING},
    {"info", PD_LOG_INFO},
    {"debug", PD_LOG_DEBUG},
};

/* The plain reads values; "new@N" is the one form with an argument. */
static const struct {
    const char *name;
    pd_reads_mode_t mode;
    unsigned percent;
} reads_forms[] = {
    {"old", PD_READS_OLD, 0},
    {"shadow", PD_READS_SHADOW, 0},
    {"aa", PD_READS_AA, 0},
    {"new", PD_READS_NEW, 100},
};

/* ---------------------------------------------------------------------------------------
 * The schema: the single description of the file (DESIGN.md §3 plus limits and log).
 */
#define OPT                     CYAML_FLAG_OPTIONAL
#define ENUM_FLAGS              CYAML_FLAG_STRICT /* names only: no numeric enum values */
#define STR(k, f, type, member) CYAML_FIELD_STRING_PTR(k, f, type, member, 1, CFG_STR_MAX)
#define ENUM(k, f, type, member, strings)                                                          \
    CYAML_FIELD_ENUM(k, (f) | ENUM_FLAGS, type, member, strings, CYAML_ARRAY_LEN(strings))
#define ENUM_PTR(k, f, type, member, strings)                                                      \
    CYAML_FIELD_ENUM_PTR(k, (f) | ENUM_FLAGS, type, member, strings, CYAML_ARRAY_LEN(strings))

static const cyaml_schema_field_t listen_fields[] = {
    STR("host", OPT, raw_listen_t, host),
    CYAML_FIELD_UINT_PTR("port", OPT, raw_listen_t, port),
    CYAML_FIELD_END,
};

static const cyaml_schema_field_t tls_fields[] = {
    STR("cert", OPT, raw_tls_t, cert),
    STR("key", OPT, raw_tls_t, key),
    ENUM_PTR("mode", OPT, raw_tls_t, mode, tls_mode_strings),
    CYAML_FIELD_END,
};

static const cyaml_schema_field_t auth_fields[] = {
    ENUM("mode", OPT, raw_auth_t, mode, auth_mode_strings),
    STR("users_file", OPT, raw_auth_t, users_file),
    CYAML_FIELD_END,
};

static const cyaml_schema_field_t admin_fields[] = {
    STR("socket", OPT, raw_admin_t, socket),
    STR("metrics", OPT, raw_admin_t, metrics),
    CYAML_FIELD_END,
};

static const cyaml_schema_field_t state_pg_fields[] = {
    STR("postgres", CYAML_FLAG_DEFAULT, raw_state_pg_t, postgres),
    CYAML_FIELD_END,
};

static const cyaml_schema_field_t divergence_fields[] = {
    STR("log", OPT, raw_divergence_t, log),
    CYAML_FIELD_FLOAT_PTR("shadow_sample", OPT | CYAML_FLAG_STRICT, raw_divergence_t,
                          shadow_sample),
    CYAML_FIELD_UINT_PTR("shadow_budget_ms", OPT, raw_divergence_t, shadow_budget_ms),
    CYAML_FIELD_END,
};

static const cyaml_schema_field_t limits_fields[] = {
    CYAML_FIELD_UINT_PTR("max_clients", OPT, raw_limits_t, max_clients),
    CYAML_FIELD_UINT_PTR("max_message_size", OPT, raw_limits_t, max_message_size),
    CYAML_FIELD_UINT_PTR("startup_timeout_ms", OPT, raw_limits_t, startup_timeout_ms),
    CYAML_FIELD_UINT_PTR("shutdown_grace_ms", OPT, raw_limits_t, shutdown_grace_ms),
    CYAML_FIELD_UINT_PTR("relay_threads", OPT, raw_limits_t, relay_threads),
    CYAML_FIELD_END,
};

static const cyaml_schema_field_t log_fields[] = {
    ENUM_PTR("level", OPT, raw_log_t, level, log_level_strings),
    CYAML_FIELD_END,
};

static const cyaml_schema_field_t database_fields[] = {
    STR("name", CYAML_FLAG_DEFAULT, pd_database_cfg_t, name),
    STR("old", CYAML_FLAG_DEFAULT, pd_database_cfg_t, old),
    STR("new", OPT, pd_database_cfg_t, new),
    CYAML_FIELD_END,
};

static const cyaml_schema_field_t column_fields[] = {
    STR("old", CYAML_FLAG_DEFAULT, pd_column_map_t, old),
    STR("new", CYAML_FLAG_DEFAULT, pd_column_map_t, new),
    STR("up", OPT, pd_column_map_t, up),
    STR("down", OPT, pd_column_map_t, down),
    CYAML_FIELD_END,
};

static const cyaml_schema_field_t mirror_fields[] = {
    ENUM("commit", OPT, raw_mirror_t, commit, commit_strings),
    ENUM("on_failure", OPT, raw_mirror_t, on_failure, on_failure_strings),
    CYAML_FIELD_END,
};

static const cyaml_schema_value_t name_entry = {
    CYAML_VALUE_STRING(CYAML_FLAG_POINTER, char, 1, CFG_STR_MAX),
};
static const cyaml_schema_value_t column_entry = {
    CYAML_VALUE_MAPPING(CYAML_FLAG_DEFAULT, pd_column_map_t, column_fields),
};

static const cyaml_schema_field_t rule_fields[] = {
    STR("name", CYAML_FLAG_DEFAULT, raw_rule_t, name),
    STR("database", CYAML_FLAG_DEFAULT, raw_rule_t, database),
    ENUM("kind", CYAML_FLAG_DEFAULT, raw_rule_t, kind, kind_strings),
    STR("table", OPT, raw_rule_t, table),
    CYAML_FIELD_SEQUENCE("key", CYAML_FLAG_POINTER | OPT, raw_rule_t, key, &name_entry, 1,
                         CYAML_UNLIMITED),
    CYAML_FIELD_SEQUENCE("columns", CYAML_FLAG_POINTER | OPT, raw_rule_t, columns, &column_entry, 1,
                         CYAML_UNLIMITED),
    CYAML_FIELD_SEQUENCE("tables", CYAML_FLAG_POINTER | OPT, raw_rule_t, tables, &name_entry, 1,
                         CYAML_UNLIMITED),
    ENUM("writes", OPT, raw_rule_t, writes, writes_strings),
    STR("reads", OPT, raw_rule_t, reads),
    CYAML_FIELD_MAPPING_PTR("mirror", OPT, raw_rule_t, mirror, mirror_fields),
    CYAML_FIELD_END,
};

static const cyaml_schema_value_t database_entry = {
    CYAML_VALUE_MAPPING(CYAML_FLAG_DEFAULT, pd_database_cfg_t, database_fields),
};
static const cyaml_schema_value_t rule_entry = {
    CYAML_VALUE_MAPPING(CYAML_FLAG_DEFAULT, raw_rule_t, rule_fields),
};

/*
 * `state` is either a string or a mapping, a union libcyaml 1.3.1 cannot express. The top
 * level therefore exists in two variants that differ only in that field; the loader looks
 * at the node type of `state` in the libyaml tree and picks the matching variant.
 */
#define TOP_FIELDS(state_field)                                                                    \
    {                                                                                              \
        CYAML_FIELD_MAPPING_PTR("listen", OPT, raw_config_t, listen, listen_fields),               \
            CYAML_FIELD_MAPPING_PTR("tls", OPT, raw_config_t, tls, tls_fields),                    \
            CYAML_FIELD_MAPPING_PTR("auth", OPT, raw_config_t, auth, auth_fields),                 \
            CYAML_FIELD_MAPPING_PTR("admin", OPT, raw_config_t, admin, admin_fields), state_field, \
            CYAML_FIELD_MAPPING_PTR("divergence", OPT, raw_config_t, divergence,                   \
                                    divergence_fields),                                            \
            CYAML_FIELD_MAPPING_PTR("limits", OPT, raw_config_t, limits, limits_fields),           \
            CYAML_FIELD_MAPPING_PTR("log", OPT, raw_config_t, log, log_fields),                    \
            CYAML_FIELD_SEQUENCE("databases", CYAML_FLAG_POINTER, raw_config_t, databases,         \
                                 &database_entry, 1, CYAML_UNLIMITED),                             \
            CYAML_FIELD_SEQUENCE("rules", CYAML_FLAG_POINTER | OPT, raw_config_t, rules,           \
                                 &rule_entry, 0, CYAML_UNLIMITED),                                 \
            CYAML_FIELD_END,                                                                       \
    }

static const cyaml_schema_field_t top_fields_state_string[] =
    TOP_FIELDS(STR("state", OPT, raw_config_t, state));
static const cyaml_schema_field_t top_fields_state_mapping[] =
    TOP_FIELDS(CYAML_FIELD_MAPPING_PTR("state", OPT, raw_config_t, state_pg, state_pg_fields));

/* walk_mapping keeps a "seen" flag per key; the widest mappings must fit. */
_Static_assert(CYAML_ARRAY_LEN(top_fields_state_string) <= CFG_MAX_FIELDS, "top too wide");
_Static_assert(CYAML_ARRAY_LEN(rule_fields) <= CFG_MAX_FIELDS, "rule too wide");

static const cyaml_schema_value_t top_schema_state_string = {
    CYAML_VALUE_MAPPING(CYAML_FLAG_POINTER, raw_config_t, top_fields_state_string),
};
static const cyaml_schema_value_t top_schema_state_mapping = {
    CYAML_VALUE_MAPPING(CYAML_FLAG_POINTER, raw_config_t, top_fields_state_mapping),
};

/* libcyaml allocates through this, so that everything it hands over can go to free(). */
static void *cyaml_mem_libc(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (size == 0) {
        free(ptr);
        return NULL;
    }
    return realloc(ptr, size);
}

static const cyaml_config_t cyaml_settings = {
    .log_fn = NULL, /* its messages have no positions; ours come from the libyaml walk */
    .mem_fn = cyaml_mem_libc,
    .log_level = CYAML_LOG_ERROR,
    .flags = CYAML_CFG_DEFAULT, /* unknown keys are errors */
};

/* ---------------------------------------------------------------------------------------
 * Value checks beyond the schema's types. Each names what a valid value looks like; the
 * same words are used when the value does not even have the schema's type.
 */
typedef bool (*value_ok_fn)(const char *value);

typedef struct {
    const cyaml_schema_field_t *fields; /* the mapping the key belongs to */
    const char *key;
    value_ok_fn ok;
    const char *expected;
} constraint_t;

/* Decimal digits only: libcyaml reads integers with strtoll(base 0), under which "010"
   would be octal 8, so such spellings are refused rather than read differently. */
static bool parse_decimal(const char *v, uint64_t max, uint64_t *out)
{
    uint64_t x = 0;
    if (v[0] == '\0' || (v[0] == '0' && v[1] != '\0'))
        return false;
    for (const char *p = v; *p != '\0'; p++) {
        if (*p < '0' || *p > '9')
            return false;
        unsigned d = (unsigned)(*p - '0');
        if (x > (max - d) / 10)
            return false;
        x = x * 10 + d;
    }
    *out = x;
    return true;
}

static bool parse_number(const char *v, double *out)
{
    char *end = NULL;
    errno = 0;
    double x = strtod(v, &end);
    if (end == v || *end != '\0' || errno == ERANGE || !isfinite(x))
        return false;
    *out = x;
    return true;
}

static bool in_range(const char *v, uint64_t min, uint64_t max)
{
    uint64_t x;
    return parse_decimal(v, max, &x) && x >= min;
}

static bool port_ok(const char *v)
{
    return in_range(v, 1, 65535);
}

static bool sample_ok(const char *v)
{
    double x;
    return parse_number(v, &x) && x >= 0.0 && x <= 1.0;
}

static bool message_size_ok(const char *v)
{
    return in_range(v, MIN_MESSAGE_SIZE, PD_MSG_MAX_LEN);
}

static bool clients_ok(const char *v)
{
    return in_range(v, 1, MAX_CLIENTS_LIMIT);
}

static bool threads_ok(const char *v)
{
    return in_range(v, 0, PD_MAX_RELAY_THREADS);
}

static bool timeout_ok(const char *v)
{
    return in_range(v, 1, UINT32_MAX);
}

/* 0 is allowed: SIGTERM then ends every session at once, like PostgreSQL's fast shutdown. */
static bool grace_ok(const char *v)
{
    return in_range(v, 0, UINT32_MAX);
}

static bool host_port_ok(const char *v)
{
    const char *colon = strrchr(v, ':');
    return colon != NULL && colon != v && port_ok(colon + 1);
}

static bool reads_ok(const char *v)
{
    pd_reads_t r;
    return pd_reads_parse(v, &r);
}

/* Rule names are typed on pgdualctl command lines and appear in metrics labels. */
static bool rule_name_ok(const char *v)
{
    for (const unsigned char *p = (const unsigned char *)v; *p != '\0'; p++)
        if (*p <= ' ' || *p == 0x7f || *p == '"' || *p == '\\')
            return false;
    return true;
}

static const constraint_t constraints[] = {
    {listen_fields, "port", port_ok, "a port number from 1 to 65535"},
    {admin_fields, "metrics", host_port_ok, "HOST:PORT, such as 127.0.0.1:9187"},
    {divergence_fields, "shadow_sample", sample_ok, "a number from 0 to 1"},
    {divergence_fields, "shadow_budget_ms", timeout_ok,
     "a whole number of milliseconds from 1 to 4294967295"},
    {limits_fields, "max_clients", clients_ok, "a whole number from 1 to 1000000"},
    {limits_fields, "max_message_size", message_size_ok, "a size in bytes from 1024 to 1073741823"},
    {limits_fields, "startup_timeout_ms", timeout_ok,
     "a whole number of milliseconds from 1 to 4294967295"},
    {limits_fields, "shutdown_grace_ms", grace_ok,
     "a whole number of milliseconds from 0 to 4294967295"},
    {limits_fields, "relay_threads", threads_ok, "a whole number from 0 to 64"},
    {rule_fields, "name", rule_name_ok, "a name without spaces, quotes or backslashes"},
    {rule_fields, "reads", reads_ok, "old, shadow, aa, new or new@N with N from 0 to 100"},
};

static const constraint_t *find_constraint(const cyaml_schema_field_t *fields, const char *key)
{
    for (size_t i = 0; i < sizeof constraints / sizeof constraints[0]; i++)
        if (constraints[i].fields == fields && strcmp(constraints[i].key, key) == 0)
            return &constraints[i];
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * Faults: collected with their positions, sorted into file order at the end.
 */
typedef struct {
    size_t line; /* 1-based; 0 for faults about the whole file */
    size_t column;
    size_t order; /* discovery order, so that sorting is stable */
    char *msg;
} fault_t;

typedef struct {
    const char *name; /* the file name used in messages */
    const char *input;
    size_t len;
    yaml_document_t doc;
    const yaml_node_t *root;
    fault_t *faults;
    size_t nfaults; /* stored */
    size_t cap;
    size_t found; /* found, including any that could not be stored for lack of memory */
} load_ctx_t;

static void add_fault(load_ctx_t *c, size_t line, size_t column, const char *fmt, va_list ap)
    __attribute__((format(printf, 4, 0)));

static void add_fault(load_ctx_t *c, size_t line, size_t column, const char *fmt, va_list ap)
{
    char text[1024];
    char *msg = NULL;
    int n;

    c->found++;
    vsnprintf(text, sizeof text, fmt, ap);
    if (line > 0)
        n = asprintf(&msg, "%s:%zu:%zu: %s", c->name, line, column, text);
    else
        n = asprintf(&msg, "%s: %s", c->name, text);
    if (n < 0)
        return;
    if (c->nfaults == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 8;
        fault_t *f = realloc(c->faults, cap * sizeof *f);
        if (f == NULL) {
            free(msg);
            return;
        }
        c->faults = f;
        c->cap = cap;
    }
    c->faults[c->nfaults] = (fault_t){line, column, c->nfaults, msg};
    c->nfaults++;
}

static void fault_at(load_ctx_t *c, yaml_mark_t mark, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fault_at(load_ctx_t *c, yaml_mark_t mark, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    add_fault(c, mark.line + 1, mark.column + 1, fmt, ap);
    va_end(ap);
}

static void fault_file(load_ctx_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void fault_file(load_ctx_t *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    add_fault(c, 0, 0, fmt, ap);
    va_end(ap);
}

static int fault_cmp(const void *a, const void *b)
{
    const fault_t *x = a, *y = b;
    if (x->line != y->line)
        return x->line < y->line ? -1 : 1;
    if (x->column != y->column)
        return x->column < y->column ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

static bool errs_push(pd_config_errors_t *errs, char *msg)
{
    char **m = realloc(errs->msgs, (errs->count + 1) * sizeof *m);
    if (m == NULL) {
        free(msg);
        return false;
    }
    m[errs->count++] = msg;
    errs->msgs = m;
    return true;
}

/* Moves the faults, in file order, to errs (which may be NULL: then they are dropped).
   Past MAX_REPORTED, one message says how many more there are: a file of garbage would
   otherwise bury the first, most useful, messages. */
static void flush_faults(load_ctx_t *c, pd_config_errors_t *errs)
{
    if (c->nfaults > 1)
        qsort(c->faults, c->nfaults, sizeof *c->faults, fault_cmp);
    for (size_t i = 0; i < c->nfaults; i++) {
        const fault_t *f = &c->faults[i];
        char *more = NULL;
        if (errs != NULL && i == MAX_REPORTED && f->line > 0 &&
            asprintf(&more, "%s:%zu:%zu: %zu more errors from here on are not shown", c->name,
                     f->line, f->column, c->found - MAX_REPORTED) >= 0)
            errs_push(errs, more);
        if (errs != NULL && i < MAX_REPORTED)
            errs_push(errs, f->msg);
        else
            free(f->msg);
    }
    if (errs != NULL && c->found > c->nfaults && c->nfaults < MAX_REPORTED) {
        char *msg = NULL;
        if (asprintf(&msg, "%s: out of memory while reporting errors", c->name) >= 0)
            errs_push(errs, msg);
    }
    free(c->faults);
    c->faults = NULL;
    c->nfaults = c->cap = 0;
}

/*
 * A value quoted into a message, or nothing at all when it might be a secret: a libpq
 * conninfo put under the wrong key has '=' (key=value) or "://" (a URI, credentials and
 * all), and a long value is rather pasted than typed. Quotes and backslashes are escaped
 * and control characters show as '?', so that the message stays one readable line.
 */
#define ECHO_MAX  48
#define ECHO_SIZE (2 * ECHO_MAX + 4)

static const char *echo(char buf[ECHO_SIZE], const char *v)
{
    size_t n = strlen(v), j = 0;

    buf[0] = '\0';
    if (n > ECHO_MAX || strchr(v, '=') != NULL || strstr(v, "://") != NULL)
        return buf;
    buf[j++] = ' ';
    buf[j++] = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)v[i];
        if (ch == '"' || ch == '\\')
            buf[j++] = '\\';
        buf[j++] = (ch < ' ' || ch == 0x7f) ? '?' : (char)ch;
    }
    buf[j++] = '"';
    buf[j] = '\0';
    return buf;
}

/* ---------------------------------------------------------------------------------------
 * The libyaml tree.
 */
static const yaml_node_t *node_at(load_ctx_t *c, int index)
{
    return yaml_document_get_node(&c->doc, index);
}

static const char *scalar_of(const yaml_node_t *n)
{
    return n != NULL && n->type == YAML_SCALAR_NODE ? (const char *)n->data.scalar.value : NULL;
}

static const yaml_node_t *map_get(load_ctx_t *c, const yaml_node_t *map, const char *key)
{
    if (map == NULL || map->type != YAML_MAPPING_NODE)
        return NULL;
    for (const yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        const char *k = scalar_of(node_at(c, p->key));
        if (k != NULL && strcmp(k, key) == 0)
            return node_at(c, p->value);
    }
    return NULL;
}

static size_t seq_len(const yaml_node_t *seq)
{
    if (seq == NULL || seq->type != YAML_SEQUENCE_NODE)
        return 0;
    return (size_t)(seq->data.sequence.items.top - seq->data.sequence.items.start);
}

static const yaml_node_t *seq_item(load_ctx_t *c, const yaml_node_t *seq, size_t i)
{
    return node_at(c, seq->data.sequence.items.start[i]);
}

static const char *node_kind(const yaml_node_t *n)
{
    switch (n->type) {
    case YAML_SCALAR_NODE:
        return "a single value";
    case YAML_SEQUENCE_NODE:
        return "a list";
    case YAML_MAPPING_NODE:
        return "a mapping";
    default:
        return "nothing";
    }
}

/* " in \"PATH\"" for messages, or " at the top level". */
static const char *where(char *buf, size_t size, const char *path)
{
    if (path[0] == '\0')
        snprintf(buf, size, " at the top level");
    else
        snprintf(buf, size, " in \"%s\"", path);
    return buf;
}

/* ---------------------------------------------------------------------------------------
 * The schema-driven walk: every key, type, enum value and required key, with positions.
 */
static void walk_value(load_ctx_t *c, const cyaml_schema_value_t *s,
                       const cyaml_schema_field_t *owner, const yaml_node_t *n, const char *path,
                       const char *key);

static bool expect_node(load_ctx_t *c, const yaml_node_t *n, yaml_node_type_t type,
                        const char *path)
{
    static const char *const wanted[] = {
        [YAML_SCALAR_NODE] = "a single value",
        [YAML_SEQUENCE_NODE] = "a list",
        [YAML_MAPPING_NODE] = "a mapping",
    };
    if (n->type == type)
        return true;
    fault_at(c, n->start_mark, "\"%s\" must be %s, not %s", path, wanted[type], node_kind(n));
    return false;
}

/* "a, b or c" from an enum table. */
static const char *enum_list(char *buf, size_t size, const cyaml_strval_t *s, uint32_t count)
{
    size_t used = 0;
    buf[0] = '\0';
    for (uint32_t i = 0; i < count && used < size; i++) {
        const char *sep = i == 0 ? "" : (i + 1 == count ? " or " : ", ");
        int n = snprintf(buf + used, size - used, "%s%s", sep, s[i].str);
        if (n < 0)
            break;
        used += (size_t)n;
    }
    return buf;
}

static bool enum_ok(const cyaml_schema_value_t *s, const char *v)
{
    for (uint32_t i = 0; i < s->enumeration.count; i++)
        if (strcmp(s->enumeration.strings[i].str, v) == 0)
            return true;
    return false;
}

static uint64_t uint_max(const cyaml_schema_value_t *s)
{
    /* libcyaml parses with strtoll, so nothing above LLONG_MAX gets through it. */
    if (s->data_size >= sizeof(uint64_t))
        return (uint64_t)LLONG_MAX;
    return (UINT64_C(1) << (8 * s->data_size)) - 1;
}

static void invalid_value(load_ctx_t *c, const yaml_node_t *n, const char *key,
                          const char *expected)
{
    char shown[ECHO_SIZE];
    fault_at(c, n->start_mark, "invalid value%s for \"%s\" (expected %s)",
             echo(shown, (const char *)n->data.scalar.value), key, expected);
}

static void walk_string(load_ctx_t *c, const cyaml_schema_value_t *s, const yaml_node_t *n,
                        const char *key)
{
    const char *v = (const char *)n->data.scalar.value;
    size_t len = strlen(v);
    bool plain = n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;

    if (len == 0)
        fault_at(c, n->start_mark, "\"%s\" has an empty value", key);
    else if (plain && (strcmp(v, "~") == 0 || strcasecmp(v, "null") == 0))
        fault_at(c, n->start_mark, "\"%s\" is null; leave the key out instead", key);
    else if (len > s->string.max)
        fault_at(c, n->start_mark, "the value of \"%s\" is longer than %u bytes", key,
                 s->string.max);
}

/* Returns whether the scalar has the schema's type; a fault names what was expected. */
static bool walk_typed_scalar(load_ctx_t *c, const cyaml_schema_value_t *s, const yaml_node_t *n,
                              const char *key, const char *expected)
{
    const char *v = (const char *)n->data.scalar.value;
    char list[256];
    uint64_t u;
    double d;

    switch (s->type) {
    case CYAML_UINT:
        if (parse_decimal(v, uint_max(s), &u))
            return true;
        invalid_value(c, n, key, expected ? expected : "a whole number");
        return false;
    case CYAML_FLOAT:
        if (parse_number(v, &d))
            return true;
        invalid_value(c, n, key, expected ? expected : "a number");
        return false;
    case CYAML_ENUM:
        if (enum_ok(s, v))
            return true;
        invalid_value(c, n, key,
                      enum_list(list, sizeof list, s->enumeration.strings, s->enumeration.count));
        return false;
    case CYAML_STRING: {
        size_t before = c->found;
        walk_string(c, s, n, key);
        return c->found == before;
    }
    default:
        return true; /* the schema uses no other scalar types */
    }
}

static void walk_scalar(load_ctx_t *c, const cyaml_schema_value_t *s,
                        const cyaml_schema_field_t *owner, const yaml_node_t *n, const char *key)
{
    const constraint_t *rule = owner != NULL ? find_constraint(owner, key) : NULL;
    const char *expected = rule != NULL ? rule->expected : NULL;

    if (walk_typed_scalar(c, s, n, key, expected) && rule != NULL &&
        !rule->ok((const char *)n->data.scalar.value))
        invalid_value(c, n, key, expected);
}

static int field_index(const cyaml_schema_field_t *fields, const char *key)
{
    for (int i = 0; fields[i].key != NULL; i++)
        if (strcmp(fields[i].key, key) == 0)
            return i;
    return -1;
}

/* Levenshtein distance, capped: enough to suggest "listen" for "lisen". */
static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    size_t row[33];
    if (la > 32 || lb > 32)
        return SIZE_MAX;
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

/* Reports an unknown key; returns the index of the key suggested instead, or -1. */
static int unknown_key(load_ctx_t *c, const cyaml_schema_field_t *fields, const yaml_node_t *k,
                       const char *path)
{
    char shown[ECHO_SIZE], in[300], hint[512];
    const char *name = (const char *)k->data.scalar.value;
    const char *best = NULL;
    size_t best_d = 3; /* suggest only close spellings */
    int best_i = -1;

    for (int i = 0; fields[i].key != NULL; i++) {
        size_t d = edit_distance(name, fields[i].key);
        if (d < best_d) {
            best_d = d;
            best = fields[i].key;
            best_i = i;
        }
    }
    if (best != NULL) {
        snprintf(hint, sizeof hint, "did you mean \"%s\"?", best);
    } else {
        size_t used = (size_t)snprintf(hint, sizeof hint, "valid keys: ");
        for (size_t i = 0; fields[i].key != NULL && used < sizeof hint; i++)
            used += (size_t)snprintf(hint + used, sizeof hint - used, "%s%s", i ? ", " : "",
                                     fields[i].key);
    }
    fault_at(c, k->start_mark, "unknown key%s%s (%s)", echo(shown, name),
             where(in, sizeof in, path), hint);
    return best_i;
}

static void join_path(char *buf, size_t size, const char *path, const char *key)
{
    snprintf(buf, size, "%s%s%s", path, path[0] ? "." : "", key);
}

static void walk_mapping(load_ctx_t *c, const cyaml_schema_field_t *fields, const yaml_node_t *n,
                         const char *path)
{
    bool seen[CFG_MAX_FIELDS] = {false};
    bool suggested[CFG_MAX_FIELDS] = {false}; /* "missing" would repeat "did you mean" */
    char child[256], in[300];

    for (const yaml_node_pair_t *p = n->data.mapping.pairs.start; p < n->data.mapping.pairs.top;
         p++) {
        const yaml_node_t *k = node_at(c, p->key), *v = node_at(c, p->value);
        const char *name = scalar_of(k);
        if (k == NULL || v == NULL)
            continue;
        if (name == NULL) {
            fault_at(c, k->start_mark, "keys%s must be names, not %s", where(in, sizeof in, path),
                     node_kind(k));
            continue;
        }
        int i = field_index(fields, name);
        if (i < 0) {
            int hint = unknown_key(c, fields, k, path);
            if (hint >= 0)
                suggested[hint] = true;
            continue;
        }
        if (seen[i]) {
            fault_at(c, k->start_mark, "duplicate key \"%s\"%s", name, where(in, sizeof in, path));
            continue;
        }
        seen[i] = true;
        join_path(child, sizeof child, path, name);
        walk_value(c, &fields[i].value, fields, v, child, fields[i].key);
    }
    for (size_t i = 0; fields[i].key != NULL; i++)
        if (!seen[i] && !suggested[i] && !(fields[i].value.flags & CYAML_FLAG_OPTIONAL))
            fault_at(c, n->start_mark, "missing required key \"%s\"%s", fields[i].key,
                     where(in, sizeof in, path));
}

static void walk_sequence(load_ctx_t *c, const cyaml_schema_value_t *s, const yaml_node_t *n,
                          const char *path, const char *key)
{
    size_t count = seq_len(n);
    char child[256];

    if (count < s->sequence.min)
        fault_at(c, n->start_mark, "\"%s\" needs at least %s", path,
                 s->sequence.min == 1 ? "one entry" : "more entries");
    for (size_t i = 0; i < count; i++) {
        const yaml_node_t *item = seq_item(c, n, i);
        if (item == NULL)
            continue;
        snprintf(child, sizeof child, "%s[%zu]", path, i);
        walk_value(c, s->sequence.entry, NULL, item, child, key);
    }
}

static void walk_value(load_ctx_t *c, const cyaml_schema_value_t *s,
                       const cyaml_schema_field_t *owner, const yaml_node_t *n, const char *path,
                       const char *key)
{
    switch (s->type) {
    case CYAML_MAPPING:
        if (expect_node(c, n, YAML_MAPPING_NODE, path))
            walk_mapping(c, s->mapping.fields, n, path);
        return;
    case CYAML_SEQUENCE:
    case CYAML_SEQUENCE_FIXED:
        if (expect_node(c, n, YAML_SEQUENCE_NODE, path))
            walk_sequence(c, s, n, path, key);
        return;
    default:
        if (expect_node(c, n, YAML_SCALAR_NODE, path))
            walk_scalar(c, s, owner, n, key);
        return;
    }
}

/* ---------------------------------------------------------------------------------------
 * Cross-field rules, checked on the tree so that they are reported together with the
 * schema faults. Each check skips what is missing or mistyped: the walk reported that.
 */
static const yaml_node_t *find_database(load_ctx_t *c, const char *name, size_t limit)
{
    const yaml_node_t *dbs = map_get(c, c->root, "databases");
    for (size_t i = 0; i < seq_len(dbs) && i < limit; i++) {
        const yaml_node_t *db = seq_item(c, dbs, i);
        const char *n = scalar_of(map_get(c, db, "name"));
        if (n != NULL && strcmp(n, name) == 0)
            return db;
    }
    return NULL;
}

static void check_databases(load_ctx_t *c)
{
    const yaml_node_t *dbs = map_get(c, c->root, "databases");
    char shown[ECHO_SIZE];

    for (size_t i = 0; i < seq_len(dbs); i++) {
        const yaml_node_t *name = map_get(c, seq_item(c, dbs, i), "name");
        const char *v = scalar_of(name);
        if (v == NULL)
            continue;
        const yaml_node_t *first = find_database(c, v, i);
        if (first != NULL)
            fault_at(c, name->start_mark, "duplicate database name%s (first defined on line %zu)",
                     echo(shown, v), first->start_mark.line + 1);
    }
}

static const yaml_node_t *find_rule(load_ctx_t *c, const char *name, size_t limit)
{
    const yaml_node_t *rules = map_get(c, c->root, "rules");
    for (size_t i = 0; i < seq_len(rules) && i < limit; i++) {
        const yaml_node_t *r = seq_item(c, rules, i);
        const char *n = scalar_of(map_get(c, r, "name"));
        if (n != NULL && strcmp(n, name) == 0)
            return r;
    }
    return NULL;
}

static void check_rule_database(load_ctx_t *c, const yaml_node_t *rule, const char *label)
{
    const yaml_node_t *dbnode = map_get(c, rule, "database");
    const yaml_node_t *kind = map_get(c, rule, "kind");
    const char *db = scalar_of(dbnode);
    char shown[ECHO_SIZE];

    if (db == NULL || db[0] == '\0')
        return;
    const yaml_node_t *target = find_database(c, db, SIZE_MAX);
    if (target == NULL) {
        fault_at(c, dbnode->start_mark, "rule %s names database%s, which is not in \"databases\"",
                 label, echo(shown, db));
        return;
    }
    const char *k = scalar_of(kind);
    if (k != NULL && strcmp(k, "tables") == 0 && map_get(c, target, "new") == NULL)
        fault_at(c, kind->start_mark,
                 "rule %s is kind tables, which moves data to a second database, but "
                 "database%s has no \"new\"",
                 label, echo(shown, db));
}

static void check_rule_kind(load_ctx_t *c, const yaml_node_t *rule, const char *label)
{
    const char *kind = scalar_of(map_get(c, rule, "kind"));
    static const char *const columns_needs[] = {"table", "key", "columns"};

    if (kind != NULL && strcmp(kind, "columns") == 0) {
        for (size_t i = 0; i < 3; i++)
            if (map_get(c, rule, columns_needs[i]) == NULL)
                fault_at(c, rule->start_mark, "rule %s is kind columns and needs \"%s\"", label,
                         columns_needs[i]);
        const yaml_node_t *tables = map_get(c, rule, "tables");
        if (tables != NULL)
            fault_at(c, tables->start_mark,
                     "rule %s is kind columns; \"tables\" belongs to kind tables", label);
    } else if (kind != NULL && strcmp(kind, "tables") == 0) {
        const yaml_node_t *table = map_get(c, rule, "table");
        if (table != NULL)
            fault_at(c, table->start_mark,
                     "rule %s is kind tables; list its tables under \"tables\", not \"table\"",
                     label);
    }
}

static void check_rules(load_ctx_t *c)
{
    const yaml_node_t *rules = map_get(c, c->root, "rules");
    char shown[ECHO_SIZE], label[ECHO_SIZE];

    for (size_t i = 0; i < seq_len(rules); i++) {
        const yaml_node_t *rule = seq_item(c, rules, i);
        if (rule == NULL || rule->type != YAML_MAPPING_NODE)
            continue;
        const yaml_node_t *name = map_get(c, rule, "name");
        const char *v = scalar_of(name);
        if (v != NULL && echo(shown, v)[0] != '\0')
            snprintf(label, sizeof label, "%s", shown + 1);
        else
            snprintf(label, sizeof label, "rules[%zu]", i);
        const yaml_node_t *first = v != NULL ? find_rule(c, v, i) : NULL;
        if (first != NULL)
            fault_at(c, name->start_mark, "duplicate rule name %s (first defined on line %zu)",
                     label, first->start_mark.line + 1);
        check_rule_database(c, rule, label);
        check_rule_kind(c, rule, label);
    }
}

static void check_auth(load_ctx_t *c)
{
    const yaml_node_t *auth = map_get(c, c->root, "auth");
    const yaml_node_t *mode = map_get(c, auth, "mode");
    const char *m = scalar_of(mode);

    if (m != NULL && strcmp(m, "scram") == 0 && map_get(c, auth, "users_file") == NULL)
        fault_at(c, mode->start_mark,
                 "auth mode scram needs \"users_file\" (lines of \"name\" \"secret\")");
}

static void check_tls(load_ctx_t *c)
{
    const yaml_node_t *tls = map_get(c, c->root, "tls");
    const yaml_node_t *mode = map_get(c, tls, "mode");
    const char *m = scalar_of(mode);
    bool cert = map_get(c, tls, "cert") != NULL, key = map_get(c, tls, "key") != NULL;

    if (tls == NULL || tls->type != YAML_MAPPING_NODE || (cert && key))
        return;
    if (m != NULL && (strcmp(m, "allow") == 0 || strcmp(m, "require") == 0))
        fault_at(c, mode->start_mark, "tls mode %s needs \"cert\" and \"key\"", m);
    else if (mode == NULL && (cert || key))
        fault_at(c, tls->start_mark, "\"tls\" names \"%s\" without \"%s\"", cert ? "cert" : "key",
                 cert ? "key" : "cert");
}

/* ---------------------------------------------------------------------------------------
 * Composing the tree with libyaml.
 */
static void syntax_fault(load_ctx_t *c, const yaml_parser_t *p)
{
    yaml_mark_t mark = p->problem_mark;
    const char *problem = p->problem ? p->problem : "malformed YAML";

    if (p->error == YAML_MEMORY_ERROR) {
        fault_file(c, "out of memory while reading the file");
        return;
    }
    if (p->error == YAML_READER_ERROR) {
        /* Reader errors carry a byte offset rather than a mark. */
        mark = (yaml_mark_t){0, 0, 0};
        for (size_t i = 0; i < p->problem_offset && i < c->len; i++) {
            if (c->input[i] == '\n') {
                mark.line++;
                mark.column = 0;
            } else {
                mark.column++;
            }
        }
    }
    if (p->context != NULL)
        fault_at(c, mark, "YAML syntax error: %s %s", problem, p->context);
    else
        fault_at(c, mark, "YAML syntax error: %s", problem);
}

/* Composes the first document; a second document is a fault (it would be ignored). */
static bool compose(load_ctx_t *c)
{
    yaml_parser_t parser;
    yaml_document_t extra;
    bool ok;

    if (!yaml_parser_initialize(&parser)) {
        fault_file(c, "out of memory while reading the file");
        return false;
    }
    yaml_parser_set_input_string(&parser, (const unsigned char *)c->input, c->len);
    ok = yaml_parser_load(&parser, &c->doc);
    if (!ok) {
        syntax_fault(c, &parser);
    } else if (!yaml_parser_load(&parser, &extra)) {
        syntax_fault(c, &parser);
    } else {
        const yaml_node_t *root = yaml_document_get_root_node(&extra);
        if (root != NULL)
            fault_at(c, extra.start_mark, "a configuration file holds one YAML document");
        yaml_document_delete(&extra);
    }
    yaml_parser_delete(&parser);
    return ok;
}

static const cyaml_schema_value_t *top_schema_for(load_ctx_t *c)
{
    const yaml_node_t *state = map_get(c, c->root, "state");
    if (state != NULL && state->type == YAML_MAPPING_NODE)
        return &top_schema_state_mapping;
    return &top_schema_state_string;
}

static void check_tree(load_ctx_t *c, const cyaml_schema_value_t *top)
{
    if (c->root == NULL) {
        fault_at(c, c->doc.start_mark, "the file has no settings; \"databases\" is required");
        return;
    }
    if (c->root->type != YAML_MAPPING_NODE) {
        fault_at(c, c->root->start_mark, "the file must be a mapping of settings, not %s",
                 node_kind(c->root));
        return;
    }
    walk_mapping(c, top->mapping.fields, c->root, "");
    check_databases(c);
    check_rules(c);
    check_auth(c);
    check_tls(c);
}

/* ---------------------------------------------------------------------------------------
 * From libcyaml's structs to pd_config_t: defaults, absolute paths, moved strings.
 */
static char *take(char **p)
{
    char *s = *p;
    *p = NULL;
    return s;
}

/* base_dir is absolute; the result is absolute. */
static char *resolve_path(const char *base_dir, const char *p)
{
    char *out = NULL;
    if (p[0] == '/')
        return strdup(p);
    while (p[0] == '.' && p[1] == '/')
        p += 2;
    if (asprintf(&out, "%s%s%s", base_dir, strcmp(base_dir, "/") == 0 ? "" : "/", p) < 0)
        return NULL;
    return out;
}

/* Resolves *raw into *out when present; false only on lack of memory. */
static bool resolve_into(char **out, const char *base_dir, const char *raw)
{
    if (raw == NULL)
        return true;
    *out = resolve_path(base_dir, raw);
    return *out != NULL;
}

static bool convert_listen_tls_auth(pd_config_t *cfg, raw_config_t *raw, const char *base_dir)
{
    raw_listen_t *l = raw->listen;
    cfg->listen_host = l != NULL && l->host != NULL ? take(&l->host) : strdup(DEFAULT_HOST);
    cfg->listen_port = l != NULL && l->port != NULL ? (uint16_t)*l->port : DEFAULT_PORT;
    if (cfg->listen_host == NULL)
        return false;

    cfg->tls_mode = PD_TLS_DISABLE;
    if (raw->tls != NULL) {
        raw_tls_t *t = raw->tls;
        if (t->mode != NULL)
            cfg->tls_mode = *t->mode;
        else if (t->cert != NULL && t->key != NULL)
            cfg->tls_mode = PD_TLS_ALLOW;
        /* The checks guarantee cert and key whenever the mode is not disable. */
        cfg->tls_configured = cfg->tls_mode != PD_TLS_DISABLE;
        if (!resolve_into(&cfg->tls_cert, base_dir, t->cert) ||
            !resolve_into(&cfg->tls_key, base_dir, t->key))
            return false;
    }

    cfg->auth_mode = PD_AUTH_TRUST;
    if (raw->auth != NULL) {
        cfg->auth_mode = raw->auth->mode;
        if (!resolve_into(&cfg->users_file, base_dir, raw->auth->users_file))
            return false;
    }
    return true;
}

static bool convert_misc(pd_config_t *cfg, raw_config_t *raw)
{
    if (raw->admin != NULL) {
        cfg->admin_socket = take(&raw->admin->socket);
        cfg->admin_metrics = take(&raw->admin->metrics);
    }
    if (raw->state_pg != NULL) {
        cfg->state = strdup("postgres");
        cfg->state_conninfo = take(&raw->state_pg->postgres);
        if (cfg->state == NULL)
            return false;
    } else {
        cfg->state = take(&raw->state);
    }

    cfg->shadow_sample = DEFAULT_SAMPLE;
    cfg->shadow_budget_ms = DEFAULT_SHADOW_BUDGET_MS;
    if (raw->divergence != NULL) {
        cfg->divergence_log = take(&raw->divergence->log);
        if (raw->divergence->shadow_sample != NULL)
            cfg->shadow_sample = *raw->divergence->shadow_sample;
        if (raw->divergence->shadow_budget_ms != NULL)
            cfg->shadow_budget_ms = *raw->divergence->shadow_budget_ms;
    }

    raw_limits_t *lim = raw->limits;
    cfg->max_clients = lim && lim->max_clients ? *lim->max_clients : DEFAULT_CLIENTS;
    cfg->max_message_size =
        lim && lim->max_message_size ? (uint32_t)*lim->max_message_size : PD_MSG_MAX_LEN;
    cfg->startup_timeout_ms =
        lim && lim->startup_timeout_ms ? *lim->startup_timeout_ms : DEFAULT_STARTUP;
    cfg->shutdown_grace_ms =
        lim && lim->shutdown_grace_ms ? *lim->shutdown_grace_ms : DEFAULT_GRACE;
    cfg->relay_threads = lim && lim->relay_threads ? *lim->relay_threads : DEFAULT_RELAY_THREADS;
    cfg->log_level = raw->log && raw->log->level ? *raw->log->level : PD_LOG_INFO;
    return true;
}

/* Where a node is (1-based), or else where the rule is. */
static void node_pos(const yaml_node_t *n, const yaml_node_t *rule, unsigned *line,
                     unsigned *column)
{
    const yaml_node_t *at = n != NULL ? n : rule;
    *line = at != NULL ? (unsigned)at->start_mark.line + 1 : 0;
    *column = at != NULL ? (unsigned)at->start_mark.column + 1 : 0;
}

static void convert_rule(pd_rule_cfg_t *out, raw_rule_t *r, load_ctx_t *c, const yaml_node_t *item)
{
    out->name = take(&r->name);
    out->database = take(&r->database);
    out->kind = r->kind;
    out->table = take(&r->table);
    out->key = r->key;
    out->key_count = r->key_count;
    r->key = NULL;
    r->key_count = 0;
    out->columns = r->columns;
    out->column_count = r->columns_count;
    r->columns = NULL;
    r->columns_count = 0;
    out->tables = r->tables;
    out->table_count = r->tables_count;
    r->tables = NULL;
    r->tables_count = 0;
    out->writes = r->writes;
    if (r->reads == NULL || !pd_reads_parse(r->reads, &out->reads))
        out->reads = (pd_reads_t){PD_READS_OLD, 0};
    out->commit = r->mirror ? r->mirror->commit : PD_COMMIT_ASYNC;
    out->on_failure = r->mirror ? r->mirror->on_failure : PD_ON_FAILURE_RECORD;
    node_pos(NULL, item, &out->line, &out->column);
    node_pos(map_get(c, item, "writes"), item, &out->writes_line, &out->writes_column);
    node_pos(map_get(c, item, "reads"), item, &out->reads_line, &out->reads_column);
}

static bool convert_lists(load_ctx_t *c, pd_config_t *cfg, raw_config_t *raw)
{
    const yaml_node_t *rules = map_get(c, c->root, "rules");

    cfg->databases = raw->databases;
    cfg->database_count = raw->databases_count;
    raw->databases = NULL;
    raw->databases_count = 0;

    if (raw->rules_count == 0)
        return true;
    cfg->rules = calloc(raw->rules_count, sizeof *cfg->rules);
    if (cfg->rules == NULL)
        return false;
    cfg->rule_count = raw->rules_count;
    for (unsigned i = 0; i < raw->rules_count; i++) {
        const yaml_node_t *item = i < seq_len(rules) ? seq_item(c, rules, i) : NULL;
        convert_rule(&cfg->rules[i], &raw->rules[i], c, item);
    }
    return true;
}

static pd_config_t *convert(load_ctx_t *c, raw_config_t *raw, const char *path,
                            const char *base_dir)
{
    pd_config_t *cfg = calloc(1, sizeof *cfg);
    if (cfg == NULL)
        return NULL;
    cfg->path = strdup(path);
    if (cfg->path == NULL || !convert_listen_tls_auth(cfg, raw, base_dir) ||
        !convert_misc(cfg, raw) || !convert_lists(c, cfg, raw)) {
        pd_config_free(cfg);
        return NULL;
    }
    return cfg;
}

/* ---------------------------------------------------------------------------------------
 * Loading.
 */
static pd_config_t *load_typed(load_ctx_t *c, const cyaml_schema_value_t *top, const char *path,
                               const char *base_dir)
{
    raw_config_t *raw = NULL;
    pd_config_t *cfg;

    errno = 0; /* libcyaml 1.3.1 tests errno after strtoll without clearing it first */
    cyaml_err_t err = cyaml_load_data((const uint8_t *)c->input, c->len, &cyaml_settings, top,
                                      (cyaml_data_t **)&raw, NULL);
    if (err != CYAML_OK) {
        /* The walk accepts only what libcyaml accepts, so this means a bug in the walk. */
        fault_file(c, "libcyaml could not load the file: %s", cyaml_strerror(err));
        return NULL;
    }
    cfg = convert(c, raw, path, base_dir);
    if (cfg == NULL)
        fault_file(c, "out of memory while loading the configuration");
    cyaml_free(&cyaml_settings, top, raw, 0);
    return cfg;
}

static pd_config_t *load(const char *input, size_t len, const char *name, const char *base_dir,
                         pd_config_errors_t *errs)
{
    load_ctx_t c = {.name = name, .input = input, .len = len};
    pd_config_t *cfg = NULL;

    if (compose(&c)) {
        c.root = yaml_document_get_root_node(&c.doc);
        const cyaml_schema_value_t *top = top_schema_for(&c);
        check_tree(&c, top);
        if (c.found == 0)
            cfg = load_typed(&c, top, name, base_dir);
        yaml_document_delete(&c.doc);
    }
    flush_faults(&c, errs);
    return cfg;
}

static char *current_dir(void)
{
    char *cwd = getcwd(NULL, 0);
    return cwd != NULL ? cwd : strdup("/");
}

/* The absolute directory holding path. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir, *cwd, *out = NULL;

    if (slash == path)
        return strdup("/");
    dir = slash != NULL ? strndup(path, (size_t)(slash - path)) : strdup(".");
    if (dir == NULL || dir[0] == '/')
        return dir;
    cwd = current_dir();
    if (cwd != NULL)
        out = strcmp(dir, ".") == 0 ? strdup(cwd) : resolve_path(cwd, dir);
    free(cwd);
    free(dir);
    return out;
}

static void push_file_error(pd_config_errors_t *errs, const char *path, const char *what)
{
    char *msg = NULL;
    if (errs != NULL && asprintf(&msg, "%s: %s", path, what) >= 0)
        errs_push(errs, msg);
}

static char *read_file(const char *path, size_t *len, pd_config_errors_t *errs)
{
    FILE *f = fopen(path, "rb");
    struct stat st;
    char *buf;

    if (f == NULL) {
        push_file_error(errs, path, strerror(errno));
        return NULL;
    }
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        push_file_error(errs, path, "not a regular file");
        fclose(f);
        return NULL;
    }
    if (st.st_size > CFG_FILE_MAX) {
        push_file_error(errs, path, "file is larger than 16 MiB");
        fclose(f);
        return NULL;
    }
    buf = malloc((size_t)st.st_size + 1);
    *len = buf != NULL ? fread(buf, 1, (size_t)st.st_size, f) : 0;
    if (buf == NULL || ferror(f)) {
        push_file_error(errs, path, buf == NULL ? "out of memory" : strerror(errno));
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[*len] = '\0';
    return buf;
}

pd_config_t *pd_config_load(const char *path, pd_config_errors_t *errs)
{
    size_t len = 0;
    char *input = read_file(path, &len, errs);
    char *base_dir;
    pd_config_t *cfg = NULL;

    if (input == NULL)
        return NULL;
    base_dir = dir_of(path);
    if (base_dir == NULL)
        push_file_error(errs, path, "out of memory");
    else
        cfg = load(input, len, path, base_dir, errs);
    free(base_dir);
    free(input);
    return cfg;
}

pd_config_t *pd_config_load_string(const char *yaml, size_t len, const char *name,
                                   pd_config_errors_t *errs)
{
    const char *shown = name != NULL ? name : "<string>";
    char *cwd = current_dir();
    pd_config_t *cfg = NULL;

    if (cwd == NULL)
        push_file_error(errs, shown, "out of memory");
    else
        cfg = load(yaml, len, shown, cwd, errs);
    free(cwd);
    return cfg;
}

/* ---------------------------------------------------------------------------------------
 * Freeing and lookups.
 */
static void free_strings(char **v, unsigned n)
{
    for (unsigned i = 0; i < n && v != NULL; i++)
        free(v[i]);
    free(v);
}

static void free_rule(pd_rule_cfg_t *r)
{
    free(r->name);
    free(r->database);
    free(r->table);
    free_strings(r->key, r->key_count);
    for (unsigned i = 0; i < r->column_count && r->columns != NULL; i++) {
        free(r->columns[i].old);
        free(r->columns[i].new);
        free(r->columns[i].up);
        free(r->columns[i].down);
    }
    free(r->columns);
    free_strings(r->tables, r->table_count);
}

/* Conninfo strings may hold passwords: wipe them before the memory is reused. */
static void free_secret(char *s)
{
    if (s == NULL)
        return;
    explicit_bzero(s, strlen(s));
    free(s);
}

pd_config_t *pd_config_ref(pd_config_t *cfg)
{
    cfg->refs++;
    return cfg;
}

void pd_config_free(pd_config_t *cfg)
{
    if (cfg == NULL)
        return;
    if (cfg->refs > 0) {
        cfg->refs--;
        return;
    }
    for (unsigned i = 0; i < cfg->database_count && cfg->databases != NULL; i++) {
        free(cfg->databases[i].name);
        free_secret(cfg->databases[i].old);
        free_secret(cfg->databases[i].new);
    }
    free(cfg->databases);
    for (unsigned i = 0; i < cfg->rule_count && cfg->rules != NULL; i++)
        free_rule(&cfg->rules[i]);
    free(cfg->rules);
    free(cfg->path);
    free(cfg->listen_host);
    free(cfg->tls_cert);
    free(cfg->tls_key);
    free(cfg->users_file);
    free(cfg->admin_socket);
    free(cfg->admin_metrics);
    free(cfg->state);
    free_secret(cfg->state_conninfo);
    free(cfg->divergence_log);
    free(cfg);
}

void pd_config_errors_free(pd_config_errors_t *errs)
{
    if (errs == NULL)
        return;
    for (size_t i = 0; i < errs->count; i++)
        free(errs->msgs[i]);
    free(errs->msgs);
    errs->msgs = NULL;
    errs->count = 0;
}

const pd_database_cfg_t *pd_config_database(const pd_config_t *cfg, const char *name)
{
    if (cfg == NULL || name == NULL)
        return NULL;
    for (unsigned i = 0; i < cfg->database_count; i++)
        if (strcmp(cfg->databases[i].name, name) == 0)
            return &cfg->databases[i];
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * Flag values, shared with the admin socket and the state file.
 */
bool pd_reads_parse(const char *text, pd_reads_t *out)
{
    uint64_t n;

    if (text == NULL || out == NULL)
        return false;
    for (size_t i = 0; i < sizeof reads_forms / sizeof reads_forms[0]; i++) {
        if (strcmp(text, reads_forms[i].name) == 0) {
            *out = (pd_reads_t){reads_forms[i].mode, reads_forms[i].percent};
            return true;
        }
    }
    if (strncmp(text, "new@", 4) != 0 || !parse_decimal(text + 4, 100, &n))
        return false;
    *out = (pd_reads_t){PD_READS_NEW, (unsigned)n};
    return true;
}

const char *pd_reads_format(const pd_reads_t *r, char *buf, size_t size)
{
    if (buf == NULL || size == 0)
        return buf;
    if (r->mode == PD_READS_NEW && r->percent != 100) {
        snprintf(buf, size, "new@%u", r->percent);
        return buf;
    }
    for (size_t i = 0; i < sizeof reads_forms / sizeof reads_forms[0]; i++) {
        if (reads_forms[i].mode == r->mode) {
            snprintf(buf, size, "%s", reads_forms[i].name);
            return buf;
        }
    }
    snprintf(buf, size, "?");
    return buf;
}

bool pd_writes_parse(const char *text, pd_writes_t *out)
{
    if (text == NULL || out == NULL)
        return false;
    for (size_t i = 0; i < CYAML_ARRAY_LEN(writes_strings); i++) {
        if (strcmp(text, writes_strings[i].str) == 0) {
            *out = (pd_writes_t)writes_strings[i].val;
            return true;
        }
    }
    return false;
}

const char *pd_writes_name(pd_writes_t w)
{
    for (size_t i = 0; i < CYAML_ARRAY_LEN(writes_strings); i++)
        if (writes_strings[i].val == (int64_t)w)
            return writes_strings[i].str;
    return "?";
}
