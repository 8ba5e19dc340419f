/*
 * config.h — pgdual's configuration: the YAML schema of DESIGN.md §3, loaded with
 * libcyaml, validated, with every error naming file:line:column and the key.
 *
 * The libcyaml schema in config.c is the single description of the file: field names,
 * types, enums and which keys are optional all come from it. A loaded pd_config_t is
 * immutable; the server holds it by reference and swaps a new one in on reload.
 * Relative paths in the file (tls.cert, tls.key, auth.users_file) are resolved against
 * the directory of the config file when loading.
 */
#ifndef PD_RULES_CONFIG_H
#define PD_RULES_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum { PD_TLS_DISABLE, PD_TLS_ALLOW, PD_TLS_REQUIRE } pd_tls_mode_t;
typedef enum { PD_AUTH_TRUST, PD_AUTH_SCRAM } pd_auth_mode_t;
typedef enum { PD_RULE_COLUMNS, PD_RULE_TABLES } pd_rule_kind_t;
typedef enum { PD_WRITES_OLD, PD_WRITES_DUAL, PD_WRITES_DUAL_NEW, PD_WRITES_NEW } pd_writes_t;
/* PD_READS_AA: shadow reads compared against the authoritative side itself (A/A), to
   measure how much two runs of the same read differ with nothing migrated: the noise
   floor that shadow divergence is judged against. */
typedef enum { PD_READS_OLD, PD_READS_SHADOW, PD_READS_NEW, PD_READS_AA } pd_reads_mode_t;
typedef enum { PD_COMMIT_ASYNC, PD_COMMIT_LOCKSTEP } pd_mirror_commit_t;
typedef enum { PD_ON_FAILURE_RECORD, PD_ON_FAILURE_FAIL } pd_on_failure_t;
typedef enum { PD_LOG_ERROR, PD_LOG_WARNING, PD_LOG_INFO, PD_LOG_DEBUG } pd_log_level_t;

/* A reads flag: "old", "shadow", "aa", "new" or "new@N" (N in 0..100: the share of sessions). */
typedef struct {
    pd_reads_mode_t mode;
    unsigned percent; /* 100 for plain "new"; N for "new@N"; 0 otherwise */
} pd_reads_t;

/* Parses a reads flag value; false if it is none of the forms above. */
bool pd_reads_parse(const char *text, pd_reads_t *out);
/* Parses a writes flag value ("old", "dual", "dual-new", "new"); false otherwise. */
bool pd_writes_parse(const char *text, pd_writes_t *out);
const char *pd_writes_name(pd_writes_t w);
/* Formats a reads flag into buf ("new@25"); returns buf. */
const char *pd_reads_format(const pd_reads_t *r, char *buf, size_t size);

typedef struct {
    char *old;  /* old column name */
    char *new;  /* new column name */
    char *up;   /* SQL expression over old columns giving new; NULL = plain copy of old */
    char *down; /* SQL expression over new columns giving old; NULL = plain copy of new */
} pd_column_map_t;

typedef struct {
    char *name;
    char *database; /* name of a pd_database_cfg_t */
    pd_rule_kind_t kind;
    char *table; /* columns: the table ("schema.table" or "table") */
    char **key;
    unsigned key_count;
    pd_column_map_t *columns;
    unsigned column_count;
    char **tables; /* tables: the tables moved; none = every table */
    unsigned table_count;
    pd_writes_t writes;
    pd_reads_t reads;
    pd_mirror_commit_t commit;
    pd_on_failure_t on_failure;
    unsigned line; /* where the rule starts in the file, for later error messages */
    unsigned column;
    /* where the values of `writes` and `reads` are (the rule's position when absent) */
    unsigned writes_line, writes_column, reads_line, reads_column;
} pd_rule_cfg_t;

typedef struct {
    char *name; /* the database name clients connect to */
    char *old;  /* libpq conninfo of old (blue) */
    char *new;  /* libpq conninfo of new (green), or NULL */
} pd_database_cfg_t;

typedef struct {
    char *path; /* the file this was loaded from */

    char *listen_host;    /* default "127.0.0.1" */
    uint16_t listen_port; /* default 6432 */

    bool tls_configured;
    pd_tls_mode_t tls_mode; /* default disable; allow when a tls: section names cert+key
                               without a mode */
    char *tls_cert;         /* absolute path or NULL */
    char *tls_key;          /* absolute path or NULL */

    pd_auth_mode_t auth_mode; /* default trust */
    char *users_file;         /* absolute path; required for scram */

    char *admin_socket;  /* NULL = no admin socket */
    char *admin_metrics; /* "host:port" or NULL */

    char *state;          /* file path, or "postgres", or NULL (flags live in memory only) */
    char *state_conninfo; /* for `state: { postgres: CONNINFO }`, else NULL */

    char *divergence_log;      /* NULL = none */
    double shadow_sample;      /* 0..1, default 0.1 */
    uint32_t shadow_budget_ms; /* a shadow read on new longer than this is cancelled and
                                  counted skipped; default 1000 (pgdual's addition) */

    /* limits: { max_clients, max_message_size, startup_timeout_ms, shutdown_grace_ms,
       relay_threads } (pgdual's own addition to the DESIGN.md schema) */
    unsigned max_clients;        /* default 1000 */
    uint32_t max_message_size;   /* default PD_MSG_MAX_LEN (1 GB - 1), at least 1024 */
    unsigned startup_timeout_ms; /* default 60000 */
    unsigned shutdown_grace_ms;  /* SIGTERM: how long transactions may finish; default 30000 */
    unsigned relay_threads;      /* event loops besides the main one that relay the sessions of
                                    databases without rules (proxy/relay.c); default 1 */

    pd_log_level_t log_level; /* log: { level: error|warning|info|debug }, default info */

    pd_database_cfg_t *databases;
    unsigned database_count;
    pd_rule_cfg_t *rules;
    unsigned rule_count;

    unsigned refs; /* references beyond the first (pd_config_ref) */
} pd_config_t;

/* A list of error messages, each "FILE:LINE:COLUMN: message" (or "FILE: message"). */
typedef struct {
    char **msgs;
    size_t count;
} pd_config_errors_t;

/*
 * Loads and validates a config file. Returns NULL when there is any error and appends
 * every error found (not just the first) to errs. Errors covered: YAML syntax, unknown
 * keys, wrong types, bad enum values (tls.mode, auth.mode, kind, writes, reads, mirror.*),
 * missing required keys, duplicate database or rule names, a rule naming a database not
 * in `databases`, a `tables` rule on a database without `new`, a `columns` rule without
 * table/key/columns, auth.mode scram without users_file, tls.mode allow/require without
 * cert and key.
 */
pd_config_t *pd_config_load(const char *path, pd_config_errors_t *errs);

/* Same, from a string in memory; `name` stands in for the file name in messages and
 * relative paths are resolved against the current directory. */
pd_config_t *pd_config_load_string(const char *yaml, size_t len, const char *name,
                                   pd_config_errors_t *errs);

/* Drops a reference to cfg (the loader's, or one of pd_config_ref); the last frees it. */
void pd_config_free(pd_config_t *cfg);
/* One more reference to cfg, which it returns, for a reader that may outlive the owner's
   (a worker thread reading a config that a reload replaces meanwhile). Not atomic: take
   and drop references on one thread. */
pd_config_t *pd_config_ref(pd_config_t *cfg);
void pd_config_errors_free(pd_config_errors_t *errs);

/* Finds a database by name, or NULL. */
const pd_database_cfg_t *pd_config_database(const pd_config_t *cfg, const char *name);

/* ---------------------------------------------------------------------------------------
 * The users file (pgbouncer's auth_file format): one `"name" "secret"` per line, the
 * secret either a plain-text password or a SCRAM-SHA-256 verifier. Lines starting with
 * ';' or '#' and blank lines are ignored; "" inside a quoted field is a literal quote.
 */
typedef struct {
    char *name;
    char *secret;
    bool is_scram; /* secret is a "SCRAM-SHA-256$..." verifier */
} pd_user_t;

typedef struct {
    pd_user_t *users;
    size_t count;
} pd_users_t;

/* Loads a users file; NULL on error with messages "FILE:LINE: ..." appended to errs.
   Never puts a secret into an error message. */
pd_users_t *pd_users_load(const char *path, pd_config_errors_t *errs);
const pd_user_t *pd_users_find(const pd_users_t *users, const char *name);
/* Frees, wiping secrets first. */
void pd_users_free(pd_users_t *users);

#endif /* PD_RULES_CONFIG_H */
