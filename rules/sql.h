/*
 * sql.h — the only caller of libpg_query: classifies SQL and rewrites it for the rules
 * (parse -> edit the tree -> deparse), with a bounded LRU cache keyed by statement text
 * and the flags in force, so that prepared statements and repeated queries cost one
 * lookup.
 *
 * Statements whose values are written into their text (the simple query protocol) share
 * one cached rewrite per shape: the rewrite of the statement's literal template, with the
 * literals' original bytes put back.
 *
 * Pure apart from the cache: no sockets, no globals, no libpq. The proxy calls it on the
 * event loop thread for Query and Parse messages; tests call it directly.
 *
 * What the rewriter does for a `columns` rule (table T, pairs old column o -> new column
 * n with `up` over old columns and `down` over new columns):
 *
 *  writes dual / dual-new: every statement that sets o also sets n = up(...) in the same
 *    statement, with the values being written substituted for the old-column references
 *    of `up` (parameters included: up "lower(email)" with VALUES ($1) gives lower($1));
 *    a statement that sets n and not o also sets o = down(...). Forms: INSERT with column
 *    list, multi-row VALUES, DEFAULT, INSERT ... SELECT, ON CONFLICT DO UPDATE (EXCLUDED.o
 *    included), UPDATE SET o = ..., SET (a, b) = (...), UPDATE ... FROM, MERGE, writes in
 *    CTEs; RETURNING stays as written. A statement setting both is left alone.
 *  writes old / new: no write rewriting.
 *  reads new: every reference to o of T (through any alias, in the target list, WHERE,
 *    JOIN, ORDER BY, GROUP BY, subqueries, CTEs, RETURNING) reads down(...) over the new
 *    columns instead; a target-list entry keeps the name the client expects (AS o); `*`
 *    and `T.*` are expanded with the catalog's column list so that o is served too.
 *  reads shadow: the statement passes unchanged and `shadow_sql` is the reads-new form.
 *  refused: what cannot be rewritten faithfully (e.g. COPY T FROM while writes is dual or
 *    dual-new; UPDATE SET (o, ...) = (SELECT ...)), with an error naming the rule.
 *
 * A `tables` rule with `columns` (new renames or transforms them) is translated while new
 * is authoritative (writes dual-new / new): its sessions talk to new in old's schema, so
 * each of its tables with mapped columns is served like a columns rule at reads=new, and
 * an assignment of o assigns n = up(...) in its place (o does not exist on new). The
 * mirror (old) then gets the client's own text (`mirror_original`) or row images read
 * back through `down`.
 *
 * Statements that cannot concern any rule pass untouched, without being parsed when a
 * cheap scan shows none of the rule tables' names in the text. In a multi-statement
 * string, statements that need no change keep their original bytes.
 */
#ifndef PD_RULES_SQL_H
#define PD_RULES_SQL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "rules/config.h"

/* What the catalog says about a rule's table (rules/catalog.c loads it through libpq). */
typedef struct pd_table_facts {
    bool loaded; /* false: facts unknown; `*` expansion under reads=new refuses */
    unsigned ncolumns;
    char **columns;  /* every column of the table, in attnum order */
    char **defaults; /* per column: its default expression as SQL text, or NULL */
    /* For `tables` rules (mirroring), also: */
    char *schema, *name; /* where the catalog found the table */
    uint32_t *types;     /* per column: its type's OID */
    char *generated;     /* per column: attidentity ('a'/'d'), attgenerated ('s') or 0 */
    unsigned nkey;       /* the rule's key, else the primary key; 0: none */
    unsigned *key;       /* column indexes of the key */
    const struct pd_table_facts *next; /* the rule's next table, or NULL */
} pd_table_facts_t;

/* The flags one session sees for one rule, with reads new@N already resolved. */
typedef struct {
    pd_writes_t writes;
    pd_reads_mode_t reads; /* PD_READS_OLD, _SHADOW, _AA or _NEW */
} pd_rule_view_t;

typedef enum {
    PD_SQL_PASS = 0, /* send the original text */
    PD_SQL_REWRITE,  /* send `sql` */
    PD_SQL_REFUSE,   /* answer with an ErrorResponse: sqlstate, message, hint */
} pd_sql_action_t;

/* What the mirror of a `tables` rule (the other database) must do with a statement. */
typedef enum {
    PD_MIRROR_NONE = 0, /* nothing: a read, or nothing of a tables rule in dual */
    PD_MIRROR_TXN,      /* transaction control: kept in step (see pd_txn_kind_t) */
    PD_MIRROR_SET,      /* a session setting (SET, RESET, DISCARD): kept in step */
    PD_MIRROR_WRITE,    /* a deterministic write: replayed verbatim */
    PD_MIRROR_IMAGE,    /* a write replayed as row images captured with RETURNING */
    PD_MIRROR_SHADOW,   /* reads=shadow: a pure read of the rule's tables, run on new too */
    PD_MIRROR_COPY,     /* COPY ... FROM STDIN: the same data replayed verbatim */
} pd_mirror_kind_t;

typedef enum {
    PD_TXN_BEGIN = 1, /* BEGIN, START TRANSACTION */
    PD_TXN_END,       /* COMMIT, END, ROLLBACK, ABORT */
    PD_TXN_INNER,     /* SAVEPOINT, RELEASE, ROLLBACK TO */
} pd_txn_kind_t;

/* How a row image is applied on the mirror. */
typedef enum {
    PD_IMAGE_INSERT = 1, /* every column of the new row */
    PD_IMAGE_UPSERT,     /* the same, ON CONFLICT (key) DO UPDATE */
    PD_IMAGE_UPDATE,     /* the new row, found by its (unchanged) key */
    PD_IMAGE_DELETE,     /* the key of the deleted row */
} pd_image_kind_t;

/* A rewrite result. Immutable and reference-counted: the cache and each user hold one. */
typedef struct {
    unsigned refs;
    pd_sql_action_t action;
    char *sql;            /* REWRITE: the statement(s) to send */
    char *shadow_sql;     /* non-NULL when a shadow read is due: the reads-new form */
    bool ordered;         /* the (shadow) query has a top-level ORDER BY */
    bool is_write;        /* INSERT/UPDATE/DELETE/MERGE/COPY FROM touching a rule table */
    int rule;             /* index in cfg->rules of the (first) rule concerned, or -1 */
    const char *sqlstate; /* REFUSE */
    char *message;        /* REFUSE: names the rule, says what happened */
    char *hint;           /* REFUSE: says what to do */

    /* Mirroring (tables rules in dual): */
    pd_mirror_kind_t mirror;
    int mirror_rule;       /* the tables rule concerned, or -1 */
    bool read_new;         /* reads=new of a tables rule while old is authoritative: a read
                              of the rule's tables only, served by new */
    bool mirror_original;  /* replay the client's text on the mirror, not `sql`: the rule's
                              columns were translated for new (new authoritative) */
    pd_txn_kind_t txn;     /* PD_MIRROR_TXN */
    bool txn_commit;       /* PD_TXN_END: COMMIT/END (not ROLLBACK/ABORT) */
    bool set_local;        /* PD_MIRROR_SET: SET LOCAL / SET TRANSACTION (txn-scoped) */
    pd_image_kind_t image; /* PD_MIRROR_IMAGE: */
    char *image_sql;       /*   applies one row on the mirror, with $1..$image_cols */
    unsigned image_cols;   /*   columns appended to the statement's RETURNING */
    uint32_t *image_types; /*   their type OIDs */
    int client_cols;       /*   the client's own RETURNING columns, -1 when it has none */
    char *image_table;     /*   "schema.table", which with the key values names a row */
    unsigned image_nkey;   /*   the key's columns ... */
    unsigned *image_key;   /*   ... as positions among the image columns */
} pd_sql_result_t;

typedef struct pd_sql pd_sql_t;

/*
 * A rewriter for the rules of one config (which must outlive it). facts[i] are the
 * catalog facts of cfg->rules[i] (NULL or .loaded = false when unknown). cache_entries
 * bounds the LRU cache (0 disables caching).
 */
pd_sql_t *pd_sql_new(const pd_config_t *cfg, const pd_table_facts_t *const *facts,
                     size_t cache_entries);
void pd_sql_free(pd_sql_t *rw);

/*
 * Classifies and rewrites one Query string or one Parse statement for a database (only
 * rules of that database apply). views[i] is the session's view of cfg->rules[i].
 * Returns a result the caller releases with pd_sql_result_release; NULL only when out of
 * memory. SQL that does not parse is passed (PASS) so that PostgreSQL reports the syntax
 * error in its own words, unless it may concern a rule in dual, when it is refused.
 */
pd_sql_result_t *pd_sql_rewrite(pd_sql_t *rw, const char *database, const char *sql,
                                const pd_rule_view_t *views);
void pd_sql_result_release(pd_sql_result_t *r);

/*
 * Cache counters, for status and metrics. hits and misses count lookups by exact text. A
 * miss without $n is looked up again by literal template (the text with its literals as
 * $1..$n): template_hits were answered from a template without parsing, template_misses
 * made a template (parsing it once), template_unusable went on to the exact path because
 * their template cannot stand for them (it does not parse, is not DML, would glue a $n to
 * its neighbour, ...). parsed counts every libpg_query parse.
 */
typedef struct {
    uint64_t hits, misses, parsed, skipped_unparsed, entries;
    uint64_t template_hits, template_misses, template_unusable;
} pd_sql_stats_t;
void pd_sql_stats(const pd_sql_t *rw, pd_sql_stats_t *out);

/* Drops every cached result (flags changed in a way views do not capture). */
void pd_sql_cache_clear(pd_sql_t *rw);

/*
 * The statement with every literal replaced by $n (pg_query_normalize), for logs and the
 * divergence log, which never carry literal values. Returns a malloc'd string, or a
 * malloc'd placeholder ("<unparseable statement>") when it does not parse.
 */
char *pd_sql_normalize(const char *sql);

/*
 * The statement names a text's `DEALLOCATE [PREPARE] name` statements drop, in order, as
 * PostgreSQL's parser reads them (quoting, case, comments): a NULL-ended malloc'd array of
 * malloc'd names (pd_sql_names_free), NULL when there are none, the text does not parse
 * or out of memory.
 */
char **pd_sql_deallocated_names(const char *sql);
void pd_sql_names_free(char **names);

#endif /* PD_RULES_SQL_H */
