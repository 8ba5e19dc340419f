/*
 * sql.c — the rewriter's front: compiles the rules of a config (tables, up/down templates,
 * catalog facts), decides cheaply whether a statement can concern a rule, keeps the result
 * cache (by exact text, and by literal template: see rewrite_templated), runs the passes of
 * sql_write.c and sql_read.c statement by statement, splices the rewritten statements into
 * the original text, and builds the reference-counted results. Also pd_sql_normalize for
 * logs.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "rules/sql_internal.h"

/* Statements longer than this get a token scan estimating their tree depth before they
   are parsed: libpg_query recurses over the tree and would exhaust the stack on a chain of
   some thousands of operators. Shorter texts cannot nest deep enough to matter. */
#define DEEP_SCAN_MIN_LEN  2048
#define DEPTH_ESTIMATE_MAX 1500

/* Statements longer than this are rewritten but not cached, so that the cache's memory
   stays bounded by its entry count. */
#define CACHE_MAX_SQL 65536

struct pd_sql {
    const pd_config_t *cfg;
    pd__rule_t *rules;
    unsigned nrules;
    pd__rule_t *xrules; /* translators (see pd__rule_t) */
    unsigned nxrules;
    pd__node_t *null_const;
    pd_sql_result_t *pass; /* shared by every statement skipped without parsing */
    pd__cache_t cache;
    bool caching;
    bool templating; /* caching, and no rule expression holds a $n of its own */
    pd_sql_stats_t stats;
};

/* ---------------------------------------------------------------------------------------
 * Refusals and small context helpers.
 */
void pd__refuse(pd__ctx_t *ctx, int rule, const char *sqlstate, const char *hint, const char *fmt,
                ...)
{
    if (ctx->refused || ctx->oom)
        return;
    va_list ap;
    va_start(ap, fmt);
    char *msg = NULL;
    int n = vasprintf(&msg, fmt, ap);
    va_end(ap);
    char *h = hint != NULL ? strdup(hint) : NULL;
    if (n < 0 || (hint != NULL && h == NULL)) {
        free(h);
        if (n >= 0)
            free(msg);
        ctx->oom = true;
        return;
    }
    ctx->refused = true;
    ctx->refuse_rule = rule;
    ctx->sqlstate = sqlstate;
    ctx->message = msg;
    ctx->hint = h;
}

void pd__refuse_rule(pd__ctx_t *ctx, const pd__rule_t *r, const char *hint, bool mirror,
                     const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *what = NULL;
    int n = vasprintf(&what, fmt, ap);
    va_end(ap);
    if (n < 0) {
        pd__oom(ctx);
        return;
    }
    const char *writes = pd_writes_name(ctx->views[r->index].writes);
    if (mirror)
        pd__refuse(ctx, r->index, "0A000", hint,
                   "pgdual: %s, so rule \"%s\" (writes=%s) could not keep the new database in "
                   "step",
                   what, r->cfg->name, writes);
    else
        pd__refuse(ctx, r->index, "0A000", hint, "pgdual: %s while rule \"%s\" has writes=%s", what,
                   r->cfg->name, writes);
    free(what);
}

bool pd__oom(pd__ctx_t *ctx)
{
    ctx->oom = true;
    return false;
}

bool pd__stopped(const pd__ctx_t *ctx)
{
    return ctx->refused || ctx->oom;
}

const pd__rule_t *pd__col_rule(const pd__ctx_t *ctx, unsigned i)
{
    return i < ctx->nrules ? &ctx->rules[i] : &ctx->xrules[i - ctx->nrules];
}

unsigned pd__col_rules(const pd__ctx_t *ctx)
{
    return ctx->nrules + ctx->nxrules;
}

static bool translating(const pd__ctx_t *ctx, const pd__rule_t *r)
{
    pd_writes_t w = ctx->views[r->index].writes;
    return ctx->in_db[r->index] && (w == PD_WRITES_DUAL_NEW || w == PD_WRITES_NEW);
}

bool pd__rule_writes_dual(const pd__ctx_t *ctx, const pd__rule_t *r)
{
    if (r->xlate)
        return translating(ctx, r);
    pd_writes_t w = ctx->views[r->index].writes;
    return r->columns_kind && ctx->in_db[r->index] &&
           (w == PD_WRITES_DUAL || w == PD_WRITES_DUAL_NEW);
}

bool pd__rule_reads_new(const pd__ctx_t *ctx, const pd__rule_t *r)
{
    if (r->xlate)
        return translating(ctx, r);
    return r->columns_kind && ctx->in_db[r->index] && ctx->views[r->index].reads == PD_READS_NEW;
}

const char *pd__rule_table(const pd__rule_t *r)
{
    if (r->label != NULL)
        return r->label;
    return r->cfg->table != NULL ? r->cfg->table : "?";
}

/* A relation without a schema matches a rule table in `public` or named without a schema;
   a rule table named without a schema is taken to live in `public` (the default
   search_path), so that "public.users" in a statement matches it too. */
static bool tname_matches(const pd__tname_t *t, const PgQuery__RangeVar *rv)
{
    if (rv->relname == NULL || strcmp(rv->relname, t->rel) != 0)
        return false;
    const char *schema =
        rv->schemaname != NULL && rv->schemaname[0] != '\0' ? rv->schemaname : NULL;
    if (schema == NULL)
        return t->schema == NULL || strcmp(t->schema, "public") == 0;
    return strcmp(schema, t->schema != NULL ? t->schema : "public") == 0;
}

int pd__rule_table_index(const pd__rule_t *r, const PgQuery__RangeVar *rv)
{
    for (unsigned i = 0; i < r->ntables; i++)
        if (tname_matches(&r->tables[i], rv))
            return (int)i;
    return -1;
}

bool pd__rule_matches(const pd__rule_t *r, const PgQuery__RangeVar *rv)
{
    return r->all_tables || pd__rule_table_index(r, rv) >= 0;
}

static int facts_column(const pd__facts_t *f, const char *col)
{
    for (unsigned i = 0; f->loaded && i < f->ncolumns; i++)
        if (strcmp(f->columns[i], col) == 0)
            return (int)i;
    return -1;
}

const pd__node_t *pd__rule_default(const pd__ctx_t *ctx, const pd__rule_t *r, const char *col,
                                   bool *known)
{
    int i = facts_column(&r->facts, col);
    *known = r->facts.loaded && (i < 0 || !r->facts.default_bad[i]);
    if (!*known)
        return NULL;
    if (i < 0 || r->facts.defaults[i] == NULL)
        return ctx->null_const;
    return r->facts.defaults[i];
}

bool pd__rule_has_default(const pd__rule_t *r, const char *col)
{
    int i = facts_column(&r->facts, col);
    return i >= 0 && (r->facts.defaults[i] != NULL || r->facts.default_bad[i]);
}

/* ---------------------------------------------------------------------------------------
 * Compiling the rules.
 */
static bool split_tname(const char *text, pd__tname_t *out)
{
    const char *dot = strchr(text, '.');
    out->schema = dot != NULL ? strndup(text, (size_t)(dot - text)) : NULL;
    out->rel = strdup(dot != NULL ? dot + 1 : text);
    return out->rel != NULL && (dot == NULL || out->schema != NULL);
}

/* A missing up/down is a plain copy: the template is a reference to the other column. */
static pd__node_t *compile_template(const char *text, const char *copy_of)
{
    if (text == NULL)
        return pd__make_column_ref(NULL, copy_of);
    return pd__parse_expr(text);
}

static bool compile_facts(pd__facts_t *out, const pd_table_facts_t *in)
{
    if (in == NULL || !in->loaded)
        return true;
    out->columns = calloc(in->ncolumns + 1, sizeof *out->columns);
    out->defaults = calloc(in->ncolumns + 1, sizeof *out->defaults);
    out->default_bad = calloc(in->ncolumns + 1, sizeof *out->default_bad);
    if (out->columns == NULL || out->defaults == NULL || out->default_bad == NULL)
        return false;
    out->ncolumns = in->ncolumns;
    for (unsigned i = 0; i < in->ncolumns; i++) {
        if ((out->columns[i] = strdup(in->columns[i])) == NULL)
            return false;
        if (in->defaults == NULL || in->defaults[i] == NULL)
            continue;
        out->defaults[i] = pd__parse_expr(in->defaults[i]);
        out->default_bad[i] = out->defaults[i] == NULL;
    }
    out->loaded = true;
    return true;
}

/* A tables rule: its listed tables, or every table the catalog found when it lists none
   (unknown facts then leave it matching every table). */
static bool compile_tables(pd__rule_t *r, const pd_rule_cfg_t *cfg, const pd_table_facts_t *facts)
{
    unsigned nfacts = 0;
    for (const pd_table_facts_t *f = facts; f != NULL && f->loaded; f = f->next)
        nfacts++;
    unsigned n = cfg->table_count > 0 ? cfg->table_count : nfacts;
    r->all_tables = n == 0;
    r->tables = calloc(n + 1, sizeof *r->tables);
    r->tfacts = calloc(n + 1, sizeof *r->tfacts);
    if (r->tables == NULL || r->tfacts == NULL)
        return false;
    const pd_table_facts_t *f = facts;
    for (unsigned i = 0; i < n; i++, r->ntables++) {
        bool known = f != NULL && f->loaded;
        if (cfg->table_count > 0) {
            if (!split_tname(cfg->tables[i], &r->tables[i]))
                return false;
        } else {
            r->tables[i].schema = strdup(f->schema);
            r->tables[i].rel = strdup(f->name);
            if (r->tables[i].schema == NULL || r->tables[i].rel == NULL)
                return false;
        }
        r->tfacts[i] = known ? f : NULL;
        f = f != NULL ? f->next : NULL;
    }
    return true;
}

static bool compile_rule(pd__rule_t *r, int index, const pd_rule_cfg_t *cfg,
                         const pd_table_facts_t *facts)
{
    r->index = index;
    r->cfg = cfg;
    r->columns_kind = cfg->kind == PD_RULE_COLUMNS;
    if (!r->columns_kind)
        return compile_tables(r, cfg, facts);
    r->tables = calloc(2, sizeof *r->tables);
    if (r->tables == NULL || !split_tname(cfg->table, &r->tables[0]))
        return false;
    r->ntables = 1;
    r->pairs = calloc(cfg->column_count + 1, sizeof *r->pairs);
    if (r->pairs == NULL)
        return false;
    for (unsigned i = 0; i < cfg->column_count; i++, r->npairs++) {
        const pd_column_map_t *m = &cfg->columns[i];
        r->pairs[i].old = m->old;
        r->pairs[i].new = m->new;
        /* A template that does not parse stays NULL; statements needing it are refused
           with a message naming the rule (config loading does not parse SQL). */
        r->pairs[i].up = compile_template(m->up, m->old);
        r->pairs[i].down = compile_template(m->down, m->new);
    }
    return compile_facts(&r->facts, facts);
}

/* The mapped columns of one table of a tables rule: a translator (see pd__rule_t), or
   nothing (r->npairs == 0) when the table has none of the rule's old columns. */
static bool compile_translator(pd__rule_t *r, int index, const pd_rule_cfg_t *cfg,
                               const pd_table_facts_t *t)
{
    r->index = index;
    r->cfg = cfg;
    r->columns_kind = true;
    r->xlate = true;
    r->tables = calloc(2, sizeof *r->tables);
    r->pairs = calloc(cfg->column_count + 1, sizeof *r->pairs);
    if (r->tables == NULL || r->pairs == NULL)
        return false;
    r->ntables = 1;
    r->tables[0].schema = strdup(t->schema);
    r->tables[0].rel = strdup(t->name);
    if (r->tables[0].schema == NULL || r->tables[0].rel == NULL ||
        asprintf(&r->label, "%s.%s", t->schema, t->name) < 0) {
        r->label = NULL;
        return false;
    }
    for (unsigned i = 0; i < cfg->column_count; i++) {
        const pd_column_map_t *m = &cfg->columns[i];
        bool has = false;
        for (unsigned c = 0; c < t->ncolumns && !has; c++)
            has = strcmp(t->columns[c], m->old) == 0;
        if (!has)
            continue;
        pd__pair_t *p = &r->pairs[r->npairs++];
        p->old = m->old;
        p->new = m->new;
        p->up = compile_template(m->up, m->old);
        p->down = compile_template(m->down, m->new);
    }
    return compile_facts(&r->facts, t);
}

static void free_rule(pd__rule_t *r);

/* Every translator of the config's tables rules that map columns, for the tables whose
   facts are known (a table whose facts are not is refused by the mirror pass). */
static bool compile_translators(pd_sql_t *rw)
{
    unsigned n = 0;
    for (unsigned i = 0; i < rw->nrules; i++)
        for (unsigned t = 0; !rw->rules[i].columns_kind && t < rw->rules[i].ntables; t++)
            n += rw->rules[i].cfg->column_count > 0 && rw->rules[i].tfacts[t] != NULL;
    rw->xrules = calloc(n + 1, sizeof *rw->xrules);
    if (rw->xrules == NULL)
        return false;
    for (unsigned i = 0; i < rw->nrules; i++) {
        const pd__rule_t *r = &rw->rules[i];
        for (unsigned t = 0; !r->columns_kind && r->cfg->column_count > 0 && t < r->ntables; t++) {
            if (r->tfacts[t] == NULL)
                continue;
            pd__rule_t *x = &rw->xrules[rw->nxrules];
            if (!compile_translator(x, (int)i, r->cfg, r->tfacts[t])) {
                free_rule(x);
                return false;
            }
            if (x->npairs == 0)
                free_rule(x);
            else
                rw->nxrules++;
        }
    }
    return true;
}

static void free_rule(pd__rule_t *r)
{
    for (unsigned i = 0; i < r->ntables; i++) {
        free(r->tables[i].schema);
        free(r->tables[i].rel);
    }
    free(r->tables);
    free(r->tfacts);
    for (unsigned i = 0; i < r->npairs; i++) {
        pd__node_free(r->pairs[i].up);
        pd__node_free(r->pairs[i].down);
    }
    free(r->pairs);
    for (unsigned i = 0; r->facts.columns != NULL && i < r->facts.ncolumns; i++) {
        free(r->facts.columns[i]);
        pd__node_free(r->facts.defaults[i]);
    }
    free(r->facts.columns);
    free(r->facts.defaults);
    free(r->facts.default_bad);
    free(r->label);
    memset(r, 0, sizeof *r);
}

static pd__node_t *make_null_const(void)
{
    PgQuery__AConst *c = malloc(sizeof *c);
    if (c == NULL)
        return NULL;
    pg_query__a__const__init(c);
    c->isnull = true;
    c->location = -1;
    return pd__node_wrap(PG_QUERY__NODE__NODE_A_CONST, c);
}

/* A $n inside an up/down expression or a column default would be copied into rewrites and
   then be taken for one of a template's literals: templates are off for such rules. */
static bool find_param(pd__node_t *n, void *arg)
{
    bool *found = arg;
    if (n->node_case == PG_QUERY__NODE__NODE_PARAM_REF)
        *found = true;
    return !*found;
}

static bool has_param(const pd__node_t *n)
{
    bool found = false;
    /* The walk does not modify the tree; the cast only fits the visitor's signature. */
    if (n != NULL && !pd__walk((ProtobufCMessage *)&n->base, find_param, &found))
        return true;
    return found;
}

static bool rules_have_params(const pd_sql_t *rw)
{
    for (unsigned i = 0; i < rw->nrules + rw->nxrules; i++) {
        const pd__rule_t *r = i < rw->nrules ? &rw->rules[i] : &rw->xrules[i - rw->nrules];
        for (unsigned p = 0; p < r->npairs; p++)
            if (has_param(r->pairs[p].up) || has_param(r->pairs[p].down))
                return true;
        for (unsigned c = 0; r->facts.loaded && c < r->facts.ncolumns; c++)
            if (has_param(r->facts.defaults[c]))
                return true;
    }
    return false;
}

static pd_sql_result_t *new_result(pd_sql_action_t action)
{
    pd_sql_result_t *r = calloc(1, sizeof *r);
    if (r == NULL)
        return NULL;
    r->refs = 1;
    r->action = action;
    r->rule = -1;
    r->mirror_rule = -1;
    return r;
}

pd_sql_t *pd_sql_new(const pd_config_t *cfg, const pd_table_facts_t *const *facts,
                     size_t cache_entries)
{
    pd_sql_t *rw = calloc(1, sizeof *rw);
    if (rw == NULL)
        return NULL;
    rw->cfg = cfg;
    rw->rules = calloc(cfg->rule_count + 1, sizeof *rw->rules);
    rw->null_const = make_null_const();
    rw->pass = new_result(PD_SQL_PASS);
    rw->caching = cache_entries > 0;
    if (rw->rules == NULL || rw->null_const == NULL || rw->pass == NULL ||
        (rw->caching && !pd__cache_init(&rw->cache, cache_entries))) {
        pd_sql_free(rw);
        return NULL;
    }
    for (unsigned i = 0; i < cfg->rule_count; i++) {
        rw->nrules++;
        if (!compile_rule(&rw->rules[i], (int)i, &cfg->rules[i], facts != NULL ? facts[i] : NULL)) {
            pd_sql_free(rw);
            return NULL;
        }
    }
    if (!compile_translators(rw)) {
        pd_sql_free(rw);
        return NULL;
    }
    rw->templating = rw->caching && !rules_have_params(rw);
    return rw;
}

void pd_sql_free(pd_sql_t *rw)
{
    if (rw == NULL)
        return;
    for (unsigned i = 0; i < rw->nrules; i++)
        free_rule(&rw->rules[i]);
    free(rw->rules);
    for (unsigned i = 0; i < rw->nxrules; i++)
        free_rule(&rw->xrules[i]);
    free(rw->xrules);
    pd__node_free(rw->null_const);
    if (rw->caching)
        pd__cache_destroy(&rw->cache);
    pd_sql_result_release(rw->pass);
    free(rw);
}

void pd_sql_result_release(pd_sql_result_t *r)
{
    if (r == NULL || --r->refs > 0)
        return;
    free(r->sql);
    free(r->shadow_sql);
    free(r->message);
    free(r->hint);
    free(r->image_sql);
    free(r->image_types);
    free(r->image_table);
    free(r->image_key);
    free(r);
}

void pd_sql_stats(const pd_sql_t *rw, pd_sql_stats_t *out)
{
    *out = rw->stats;
    out->entries = rw->caching ? rw->cache.count : 0;
}

void pd_sql_cache_clear(pd_sql_t *rw)
{
    if (rw->caching)
        pd__cache_clear(&rw->cache);
}

/* ---------------------------------------------------------------------------------------
 * The cheap check: can the text name a rule table at all?
 */
static bool in_database(const pd_sql_t *rw, unsigned i, const char *database)
{
    const char *db = rw->rules[i].cfg->database;
    return db != NULL && database != NULL && strcmp(db, database) == 0;
}

/* The rule tables' bare names are searched case-insensitively, which also finds them
   quoted. A Unicode-escaped identifier (U&"\0075sers") can spell a name without
   containing it, so its mere presence sends the text to the parser. */
static bool rule_mentioned(const pd__rule_t *r, const char *sql)
{
    if (r->all_tables)
        return true;
    for (unsigned t = 0; t < r->ntables; t++)
        if (strcasestr(sql, r->tables[t].rel) != NULL)
            return true;
    return false;
}

static size_t leading_trivia(const char *s, size_t len);

/* Does the statement start with a word of transaction control or session settings, which
   a tables rule's mirror keeps in step whatever tables they mention (none)? */
static bool starts_with_keeping_word(const char *sql)
{
    static const char *const words[] = {"begin",   "start",     "commit",  "end",     "rollback",
                                        "abort",   "savepoint", "release", "set",     "reset",
                                        "discard", "prepare",   "listen",  "unlisten"};
    const char *p = sql + leading_trivia(sql, strlen(sql));
    size_t n = 0;
    while ((p[n] >= 'a' && p[n] <= 'z') || (p[n] >= 'A' && p[n] <= 'Z'))
        n++;
    for (size_t i = 0; i < sizeof words / sizeof *words; i++)
        if (strlen(words[i]) == n && strncasecmp(p, words[i], n) == 0)
            return true;
    return false;
}

/* Does the rule keep a session's second connection in step (writes mirrored, or A/A
   reads), so that transaction control and settings must be examined too? */
static bool mirrors(const pd_sql_t *rw, unsigned i, const pd_rule_view_t *views)
{
    pd_writes_t w = views != NULL ? views[i].writes : rw->rules[i].cfg->writes;
    pd_reads_mode_t rd = views != NULL ? views[i].reads : rw->rules[i].cfg->reads.mode;
    return !rw->rules[i].columns_kind &&
           (w == PD_WRITES_DUAL || w == PD_WRITES_DUAL_NEW || rd == PD_READS_AA);
}

static bool may_concern_rule(const pd_sql_t *rw, const char *database, const char *sql,
                             const pd_rule_view_t *views)
{
    bool escaped = strcasestr(sql, "u&\"") != NULL;
    int keeping = -1; /* computed when first needed */
    for (unsigned i = 0; i < rw->nrules; i++) {
        if (!in_database(rw, i, database))
            continue;
        if (escaped || rule_mentioned(&rw->rules[i], sql))
            return true;
        if (mirrors(rw, i, views)) {
            if (keeping < 0)
                keeping = starts_with_keeping_word(sql);
            if (keeping)
                return true;
        }
    }
    return false;
}

static bool view_active(const pd_rule_view_t *v)
{
    return (v->writes != PD_WRITES_OLD && v->writes != PD_WRITES_NEW) || v->reads != PD_READS_OLD;
}

/* The rule to blame when a statement cannot be examined: the first active rule of the
   database whose table the text mentions, else the first active rule; -1 when none is
   active (the statement can then pass: nothing would be rewritten anyway). */
static int blamed_rule(const pd_sql_t *rw, const char *database, const char *sql,
                       const pd_rule_view_t *views)
{
    int first_active = -1;
    for (unsigned i = 0; i < rw->nrules; i++) {
        if (!in_database(rw, i, database) || !view_active(&views[i]))
            continue;
        if (rule_mentioned(&rw->rules[i], sql))
            return (int)i;
        if (first_active < 0)
            first_active = (int)i;
    }
    return first_active;
}

/* ---------------------------------------------------------------------------------------
 * Depth estimate from tokens. Binary operators chain to the left without parentheses and
 * set operations and joins nest their left side; a comma, AND or OR starts a new, flat
 * element. The estimate is the deepest sum of chain lengths over the open parentheses.
 */
typedef struct {
    long chain, setops;
} level_t;

static bool is_operator_token(PgQuery__Token t)
{
    switch (t) {
    case PG_QUERY__TOKEN__ASCII_37:
    case PG_QUERY__TOKEN__ASCII_42:
    case PG_QUERY__TOKEN__ASCII_43:
    case PG_QUERY__TOKEN__ASCII_45:
    case PG_QUERY__TOKEN__ASCII_47:
    case PG_QUERY__TOKEN__ASCII_60:
    case PG_QUERY__TOKEN__ASCII_61:
    case PG_QUERY__TOKEN__ASCII_62:
    case PG_QUERY__TOKEN__ASCII_94:
    case PG_QUERY__TOKEN__Op:
    case PG_QUERY__TOKEN__TYPECAST:
    case PG_QUERY__TOKEN__LESS_EQUALS:
    case PG_QUERY__TOKEN__GREATER_EQUALS:
    case PG_QUERY__TOKEN__NOT_EQUALS:
    case PG_QUERY__TOKEN__NOT:
    case PG_QUERY__TOKEN__IS:
    case PG_QUERY__TOKEN__COLLATE:
    case PG_QUERY__TOKEN__JOIN:
    case PG_QUERY__TOKEN__CASE:
        return true;
    default:
        return false;
    }
}

static long estimate_depth(pd__scan_t *scan)
{
    level_t stack[512];
    int top = 0;
    long base = 0, max = 0;
    stack[0] = (level_t){0, 0};
    pd__token_t tok;
    while (pd__scan_next(scan, &tok)) {
        PgQuery__Token t = tok.token;
        level_t *l = &stack[top];
        if (t == PG_QUERY__TOKEN__ASCII_40 || t == PG_QUERY__TOKEN__ASCII_91) {
            if (top + 1 >= (int)(sizeof stack / sizeof *stack))
                return DEPTH_ESTIMATE_MAX + 1;
            base += l->chain + l->setops + 1;
            stack[++top] = (level_t){0, 0};
        } else if ((t == PG_QUERY__TOKEN__ASCII_41 || t == PG_QUERY__TOKEN__ASCII_93) && top > 0) {
            top--;
            base -= stack[top].chain + stack[top].setops + 1;
        } else if (t == PG_QUERY__TOKEN__ASCII_44 || t == PG_QUERY__TOKEN__AND ||
                   t == PG_QUERY__TOKEN__OR) {
            l->chain = 0;
        } else if (t == PG_QUERY__TOKEN__ASCII_59) {
            top = 0;
            base = 0;
            stack[0] = (level_t){0, 0};
        } else if (t == PG_QUERY__TOKEN__UNION || t == PG_QUERY__TOKEN__INTERSECT ||
                   t == PG_QUERY__TOKEN__EXCEPT) {
            l->chain = 0;
            l->setops++;
        } else if (is_operator_token(t)) {
            l->chain++;
        }
        long depth = base + stack[top].chain + stack[top].setops;
        if (depth > max)
            max = depth;
    }
    return max;
}

/* False when the statement may nest too deep for the parser and the passes. */
static bool depth_ok(const char *sql)
{
    if (strlen(sql) < DEEP_SCAN_MIN_LEN)
        return true;
    pd__scan_t scan;
    if (!pd__scan_open(&scan, sql))
        return true; /* the parser will reject it too, without recursing far */
    bool ok = estimate_depth(&scan) <= DEPTH_ESTIMATE_MAX && !scan.bad;
    pd__scan_close(&scan);
    return ok;
}

/* ---------------------------------------------------------------------------------------
 * Building results.
 */
static pd_sql_result_t *refusal(int rule, const char *sqlstate, char *message, char *hint)
{
    pd_sql_result_t *r = new_result(PD_SQL_REFUSE);
    if (r == NULL) {
        free(message);
        free(hint);
        return NULL;
    }
    r->rule = rule;
    r->sqlstate = sqlstate;
    r->message = message;
    r->hint = hint;
    return r;
}

/* A statement the parser cannot read (or too deep to walk): PostgreSQL reports its own
   error when no rule is active; otherwise pgdual cannot know what it writes. */
static pd_sql_result_t *unreadable(pd_sql_t *rw, const char *database, const char *sql,
                                   const pd_rule_view_t *views, int cursor, bool too_deep)
{
    int rule = blamed_rule(rw, database, sql, views);
    if (rule < 0)
        return new_result(PD_SQL_PASS);
    const char *name = rw->rules[rule].cfg->name;
    char *msg = NULL, *hint = NULL;
    int n;
    if (too_deep) {
        n = asprintf(&msg,
                     "pgdual: the statement is nested too deeply to be examined, so it cannot "
                     "keep rule \"%s\" in step",
                     name);
    } else {
        n = asprintf(&msg,
                     "pgdual: could not parse the statement (syntax error at or near character "
                     "%d), so it cannot keep the columns of rule \"%s\" in step",
                     cursor, name);
    }
    if (n < 0)
        return NULL;
    if (asprintf(&hint,
                 too_deep ? "Split the statement, or set writes=old and reads=old for rule %s "
                            "while it runs."
                          : "Check the statement's syntax. pgdual parses with PostgreSQL 15's "
                            "grammar; for newer syntax, set writes=old and reads=old for rule "
                            "%s while it runs.",
                 name) < 0) {
        free(msg);
        return NULL;
    }
    return refusal(rule, too_deep ? "54001" : "42601", msg, hint);
}

/* The leading whitespace and comments of a statement's span, which a rewritten statement
   keeps (application tags often live in a leading comment). */
static size_t leading_trivia(const char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        if (strchr(" \t\r\n\f\v", s[i]) != NULL) {
            i++;
        } else if (i + 1 < len && s[i] == '-' && s[i + 1] == '-') {
            while (i < len && s[i] != '\n')
                i++;
        } else if (i + 1 < len && s[i] == '/' && s[i + 1] == '*') {
            int depth = 0;
            do {
                if (i + 1 < len && s[i] == '/' && s[i + 1] == '*') {
                    depth++;
                    i += 2;
                } else if (i + 1 < len && s[i] == '*' && s[i + 1] == '/') {
                    depth--;
                    i += 2;
                } else {
                    i++;
                }
            } while (depth > 0 && i < len);
        } else {
            break;
        }
    }
    return i;
}

void pd__text_add(pd__text_t *t, const char *s, size_t n)
{
    if (t->oom || (n == 0 && t->buf != NULL))
        return;
    if (t->len + n + 1 > t->cap) {
        size_t cap = (t->len + n + 1) * 2;
        char *grown = realloc(t->buf, cap);
        if (grown == NULL) {
            t->oom = true;
            return;
        }
        t->buf = grown;
        t->cap = cap;
    }
    memcpy(t->buf + t->len, s, n);
    t->len += n;
    t->buf[t->len] = '\0';
}

/* ---------------------------------------------------------------------------------------
 * One call: every statement of the string, then the shadow form.
 */
typedef struct {
    pd_sql_t *rw;
    const char *database;
    const char *sql;
    const pd_rule_view_t *views;
    bool *in_db;
    pd_rule_view_t *primary; /* reads shadow as old */
    pd_rule_view_t *shadow;  /* reads shadow as new */
    bool any_shadow;
    PgQueryProtobufParseResult parsed;
    bool templating;    /* sql is a literal template being rewritten ... */
    bool untemplatable; /* ... and its rewrite cannot stand for the statements of its shape */
} job_t;

static void ctx_init(pd__ctx_t *ctx, const job_t *job, const pd_rule_view_t *views)
{
    memset(ctx, 0, sizeof *ctx);
    ctx->rules = job->rw->rules;
    ctx->nrules = job->rw->nrules;
    ctx->xrules = job->rw->xrules;
    ctx->nxrules = job->rw->nxrules;
    ctx->in_db = job->in_db;
    ctx->views = views;
    ctx->given = job->views;
    ctx->null_const = job->rw->null_const;
    ctx->rule = -1;
    ctx->refuse_rule = -1;
    ctx->mirror_rule = -1;
}

static void ctx_done(pd__ctx_t *ctx)
{
    free(ctx->message);
    free(ctx->hint);
    free(ctx->image_sql);
    free(ctx->image_types);
    free(ctx->image_table);
    free(ctx->image_key);
}

static void run_passes(pd__ctx_t *ctx, pd__node_t *stmt, bool writes)
{
    pd__classify(ctx, stmt);
    if (writes && !pd__stopped(ctx))
        pd__rewrite_writes(ctx, stmt);
    if (writes && !pd__stopped(ctx))
        pd__plan_mirror(ctx, stmt);
    if (!pd__stopped(ctx))
        pd__rewrite_reads(ctx, stmt);
    if (writes && !pd__stopped(ctx))
        pd__settle_mirror(ctx);
}

static PgQuery__ParseResult *unpack(const job_t *job)
{
    return pg_query__parse_result__unpack(NULL, job->parsed.parse_tree.len,
                                          (const uint8_t *)job->parsed.parse_tree.data);
}

/* A shadow read runs the statement a second time: only a SELECT that changes nothing and
   calls no volatile function (nextval() would advance twice) may be run so. */
static bool pure_read(const pd__node_t *stmt)
{
    const char *fname = NULL;
    return stmt != NULL && stmt->node_case == PG_QUERY__NODE__NODE_SELECT_STMT &&
           stmt->select_stmt->into_clause == NULL && !pd__has_dml(stmt) &&
           !pd__calls_volatile(stmt, &fname);
}

static void stmt_span(const job_t *job, const PgQuery__RawStmt *raw, size_t *start, size_t *end)
{
    size_t total = strlen(job->sql);
    *start = raw->stmt_location > 0 ? (size_t)raw->stmt_location : 0;
    if (*start > total)
        *start = total;
    *end = raw->stmt_len > 0 ? *start + (size_t)raw->stmt_len : total;
    if (*end > total)
        *end = total;
}

/* The shadow form of a single pure read: the reads-new rewrite with shadow rules as new.
   A refusal of the shadow form only means there is nothing to compare. */
static bool shadow_form(job_t *job, pd_sql_result_t *res)
{
    PgQuery__ParseResult *tree = unpack(job);
    if (tree == NULL)
        return false;
    PgQuery__RawStmt *raw = tree->stmts[0];
    pd__ctx_t ctx;
    ctx_init(&ctx, job, job->shadow);
    run_passes(&ctx, raw->stmt, false);
    bool ok = !ctx.oom;
    if (ok && !ctx.refused && ctx.changed) {
        size_t start, end;
        stmt_span(job, raw, &start, &end);
        size_t lead = leading_trivia(job->sql + start, end - start);
        char *body = pd__deparse(raw, tree->version);
        pd__text_t t = {0};
        pd__text_add(&t, job->sql + start, lead);
        if (body != NULL)
            pd__text_add(&t, body, strlen(body));
        free(body);
        ok = !t.oom;
        if (body != NULL && ok && (res->sql == NULL || strcmp(res->sql, t.buf) != 0))
            res->shadow_sql = t.buf;
        else
            free(t.buf);
    }
    ctx_done(&ctx);
    pg_query__parse_result__free_unpacked(tree, NULL);
    return ok;
}

static pd_sql_result_t *refused_result(pd__ctx_t *ctx)
{
    pd_sql_result_t *r = refusal(ctx->refuse_rule, ctx->sqlstate, ctx->message, ctx->hint);
    ctx->message = NULL;
    ctx->hint = NULL;
    if (r != NULL)
        r->is_write = ctx->is_write;
    return r;
}

static void note_rule(pd_sql_result_t *res, const pd__ctx_t *ctx)
{
    res->is_write = res->is_write || ctx->is_write;
    if (ctx->rule >= 0 && (res->rule < 0 || ctx->rule < res->rule))
        res->rule = ctx->rule;
}

/*
 * Folds one statement's mirror plan into the result. A single statement's plan is taken
 * whole. A multi-statement string is replayed on the mirror as it is, so it may carry
 * writes and settings, or one transaction-control statement alone; row images and
 * transaction control mixed with mirrored statements are refused.
 */
static void note_mirror(pd_sql_result_t *res, pd__ctx_t *ctx, size_t nstmts)
{
    if (ctx->mirror == PD_MIRROR_NONE || ctx->refused)
        return;
    for (unsigned i = 0; i < ctx->nxrules; i++)
        res->mirror_original = res->mirror_original || pd__rule_writes_dual(ctx, &ctx->xrules[i]);
    if (nstmts == 1) {
        res->mirror = ctx->mirror;
        res->mirror_rule = ctx->mirror_rule;
        res->txn = ctx->txn;
        res->txn_commit = ctx->txn_commit;
        res->set_local = ctx->set_local;
        res->image = ctx->image;
        res->image_sql = ctx->image_sql;
        res->image_cols = ctx->image_cols;
        res->image_types = ctx->image_types;
        res->client_cols = ctx->client_cols;
        res->image_table = ctx->image_table;
        res->image_nkey = ctx->image_nkey;
        res->image_key = ctx->image_key;
        ctx->image_sql = NULL;
        ctx->image_types = NULL;
        ctx->image_table = NULL;
        ctx->image_key = NULL;
        return;
    }
    bool txn = ctx->mirror == PD_MIRROR_TXN || res->mirror == PD_MIRROR_TXN;
    if (ctx->mirror == PD_MIRROR_IMAGE || (txn && res->mirror != PD_MIRROR_NONE)) {
        const pd__rule_t *r = &ctx->rules[ctx->mirror_rule];
        pd__refuse(
            ctx, r->index, "0A000", "Send the statements one at a time (not in one query string).",
            "pgdual: a query string with several statements %s, so rule \"%s\" could "
            "not keep the new database in step",
            ctx->mirror == PD_MIRROR_IMAGE ? "has a write that must be replayed as row images"
                                           : "mixes transaction control with mirrored statements",
            r->cfg->name);
        return;
    }
    res->mirror = ctx->mirror == PD_MIRROR_TXN ? PD_MIRROR_TXN : PD_MIRROR_WRITE;
    res->txn = ctx->txn;
    res->mirror_rule = ctx->mirror_rule;
}

/* Rewrites one statement into text t (its original bytes when unchanged). Returns NULL to
   continue, or a final result (a refusal), or sets *oom. */
static pd_sql_result_t *one_statement(job_t *job, PgQuery__ParseResult *tree, size_t i,
                                      pd__text_t *t, size_t *cursor, pd_sql_result_t *res,
                                      bool *changed, bool *oom)
{
    PgQuery__RawStmt *raw = tree->stmts[i];
    pd__ctx_t ctx;
    ctx_init(&ctx, job, job->primary);
    run_passes(&ctx, raw->stmt, true);
    note_rule(res, &ctx);
    note_mirror(res, &ctx, tree->n_stmts);
    if (ctx.read_new && tree->n_stmts == 1) {
        res->read_new = true;
        res->mirror_rule = ctx.mirror_rule;
    }
    pd_sql_result_t *final = NULL;
    if (ctx.oom) {
        *oom = true;
    } else if (ctx.refused) {
        final = refused_result(&ctx);
        *oom = final == NULL;
    } else if (ctx.changed) {
        size_t start, end;
        stmt_span(job, raw, &start, &end);
        char *body = pd__deparse(raw, tree->version);
        if (body == NULL) {
            /* The deparser may fail on a $n where it takes a literal apart (or the reverse):
               a template's failure says nothing about the statement itself. */
            job->untemplatable = job->untemplatable || job->templating;
            pd__refuse(&ctx, res->rule, "XX000",
                       "Report this statement to the pgdual maintainers; meanwhile set "
                       "writes=old and reads=old for the rule while it runs.",
                       "pgdual could not render its rewrite of the statement");
            final = refused_result(&ctx);
            *oom = final == NULL;
        } else {
            size_t lead = leading_trivia(job->sql + start, end - start);
            pd__text_add(t, job->sql + *cursor, start + lead - *cursor);
            pd__text_add(t, body, strlen(body));
            *cursor = end;
            *changed = true;
            free(body);
        }
    }
    ctx_done(&ctx);
    return final;
}

static bool ordered(const pd__node_t *stmt)
{
    return stmt != NULL && stmt->node_case == PG_QUERY__NODE__NODE_SELECT_STMT &&
           stmt->select_stmt->n_sort_clause > 0;
}

static pd_sql_result_t *rewrite_tree(job_t *job, PgQuery__ParseResult *tree)
{
    pd_sql_result_t *res = new_result(PD_SQL_PASS);
    if (res == NULL)
        return NULL;
    pd__text_t t = {0};
    size_t cursor = 0;
    bool changed = false, oom = false;
    for (size_t i = 0; i < tree->n_stmts && !oom; i++) {
        pd_sql_result_t *final = one_statement(job, tree, i, &t, &cursor, res, &changed, &oom);
        if (final != NULL) {
            if (final->rule < 0)
                final->rule = res->rule;
            final->is_write = final->is_write || res->is_write;
            pd_sql_result_release(res);
            free(t.buf);
            return final;
        }
    }
    if (changed) {
        pd__text_add(&t, job->sql + cursor, strlen(job->sql + cursor));
        res->action = PD_SQL_REWRITE;
        res->sql = t.buf;
        t.buf = NULL;
    }
    free(t.buf);
    if (!oom && !t.oom && tree->n_stmts == 1) {
        res->ordered = ordered(tree->stmts[0]->stmt);
        if (job->any_shadow && pure_read(tree->stmts[0]->stmt))
            oom = !shadow_form(job, res);
    }
    if (oom || t.oom) {
        pd_sql_result_release(res);
        return NULL;
    }
    return res;
}

/* The statement kinds a template may stand for. The passes never look at a literal's value
   in these (only at names and the shape of the tree), and their grammar has no place where
   libpg_query takes a $n but the value of the literal could make the statement fail to
   parse. Utility statements are not templated: DO bodies are literals the passes read, and
   COPY, SET, DDL and the like take literals as names and options. */
static bool templatable_kinds(const PgQuery__ParseResult *tree)
{
    for (size_t i = 0; i < tree->n_stmts; i++) {
        const pd__node_t *stmt = tree->stmts[i]->stmt;
        switch (stmt != NULL ? stmt->node_case : PG_QUERY__NODE__NODE__NOT_SET) {
        case PG_QUERY__NODE__NODE_SELECT_STMT:
        case PG_QUERY__NODE__NODE_INSERT_STMT:
        case PG_QUERY__NODE__NODE_UPDATE_STMT:
        case PG_QUERY__NODE__NODE_DELETE_STMT:
        case PG_QUERY__NODE__NODE_MERGE_STMT:
        case PG_QUERY__NODE__NODE_TRANSACTION_STMT:
            continue;
        default:
            return false;
        }
    }
    return true;
}

static pd_sql_result_t *untemplatable(job_t *job)
{
    job->untemplatable = true;
    return NULL;
}

/* Rewrites job->sql. For a template (job->templating), what only the statement itself can
   answer (too deep, does not parse, a kind that is not templated) sets job->untemplatable
   instead of producing a result. */
static pd_sql_result_t *compute(job_t *job)
{
    pd_sql_t *rw = job->rw;
    if (!depth_ok(job->sql))
        return job->templating ? untemplatable(job)
                               : unreadable(rw, job->database, job->sql, job->views, 0, true);
    job->parsed = pg_query_parse_protobuf(job->sql);
    rw->stats.parsed++;
    pd_sql_result_t *res;
    if (job->parsed.error != NULL) {
        res = job->templating ? untemplatable(job)
                              : unreadable(rw, job->database, job->sql, job->views,
                                           job->parsed.error->cursorpos, false);
    } else {
        PgQuery__ParseResult *tree = unpack(job);
        if (tree != NULL && job->templating && !templatable_kinds(tree))
            res = untemplatable(job);
        else
            res = tree != NULL ? rewrite_tree(job, tree) : NULL;
        if (tree != NULL)
            pg_query__parse_result__free_unpacked(tree, NULL);
    }
    pg_query_free_protobuf_parse_result(job->parsed);
    return res;
}

/* Splits reads=shadow into the two passes' views: old for the statement sent, new for
   its shadow form. */
static void resolve_views(job_t *job)
{
    for (unsigned i = 0; i < job->rw->nrules; i++) {
        pd_rule_view_t v = job->views[i];
        job->in_db[i] = in_database(job->rw, i, job->database);
        job->primary[i] = v;
        job->shadow[i] = v;
        if (v.reads == PD_READS_SHADOW) {
            job->primary[i].reads = PD_READS_OLD;
            job->shadow[i].reads = PD_READS_NEW;
            job->any_shadow = job->any_shadow || job->in_db[i];
        } else if (v.reads == PD_READS_AA) {
            /* tables rules only: the mirror pass compares old with old (sql_mirror.c) */
            job->primary[i].reads = job->shadow[i].reads = PD_READS_OLD;
        }
    }
}

/* The configured flags, for a caller that gives no views (new@N counts as new only at
   100 %: choosing per session is the caller's business). */
static void configured_views(const pd_sql_t *rw, pd_rule_view_t *out)
{
    for (unsigned i = 0; i < rw->nrules; i++) {
        const pd_rule_cfg_t *cfg = rw->rules[i].cfg;
        out[i].writes = cfg->writes;
        out[i].reads = cfg->reads.mode;
        if (cfg->reads.mode == PD_READS_NEW && cfg->reads.percent < 100)
            out[i].reads = PD_READS_OLD;
    }
}

/* A cache key: a tag telling exact texts ('X') from templates ('T'), the database, the text,
   the template's literal kinds (none for exact texts), and the view of every rule of that
   database. The text and the kinds contain no NUL, so the parts cannot run into each other. */
static char *cache_key(const job_t *job, char tag, const char *text, size_t textlen,
                       const char *kinds, size_t *len)
{
    size_t dblen = strlen(job->database), klen = strlen(kinds);
    size_t n = 1 + dblen + 1 + textlen + 1 + klen + 2 * (size_t)job->rw->nrules;
    char *key = malloc(n);
    if (key == NULL)
        return NULL;
    size_t at = 0;
    key[at++] = tag;
    memcpy(key + at, job->database, dblen + 1);
    at += dblen + 1;
    memcpy(key + at, text, textlen);
    at += textlen;
    key[at++] = '\0';
    memcpy(key + at, kinds, klen);
    at += klen;
    for (unsigned i = 0; i < job->rw->nrules; i++) {
        if (!job->in_db[i])
            continue;
        key[at++] = (char)('0' + job->views[i].writes);
        key[at++] = (char)('0' + job->views[i].reads);
    }
    *len = at;
    return key;
}

static void release_result(void *value)
{
    pd_sql_result_release(value);
}

/* ---------------------------------------------------------------------------------------
 * Literal templates. With the simple query protocol every statement carries its values in
 * its text, so the exact-text cache never hits. A statement without $n is looked up once
 * more with its literals replaced by $1..$n (sql_tmpl.c): the rewrite of that template,
 * computed once, is the rewrite of every statement of the same shape with the literals'
 * original bytes put back where it has $i. That holds because the passes only move and copy
 * the literals' nodes, never read their values, in the statement kinds templated
 * (templatable_kinds), and because PostgreSQL reads a literal put in the place of a $n as
 * the literal it was. Every way in which a template could mean something else than its
 * statements makes the template "unusable", which is cached too, so that such shapes cost
 * one scan more than the exact path and never a failed rewrite again.
 */
typedef struct {
    pd_sql_result_t *result; /* NULL: unusable; else the template's own result */
    size_t nlits;
    size_t *at;              /* where each $i stood in the template text (pd__lits_t.at) */
    pd__split_t sql, shadow; /* result's sql and shadow_sql, cut at their $i; text NULL if none */
} tmpl_t;

static void release_tmpl(void *value)
{
    tmpl_t *t = value;
    pd_sql_result_release(t->result);
    free(t->at);
    pd__split_free(&t->sql);
    pd__split_free(&t->shadow);
    free(t);
}

/* The statement the template was made from parsed; one with the same literal kinds in the
   same places parses too (the grammar sees kinds, not values, and the places where it
   checks a value do not take a $n: the template would not have parsed). */
static bool statement_parses(pd_sql_t *rw, const char *sql)
{
    PgQuerySplitResult sr = pg_query_split_with_parser(sql);
    rw->stats.parsed++;
    bool ok = sr.error == NULL;
    pg_query_free_split_result(sr);
    return ok;
}

/* Cuts the template's texts at their $i. The result's own texts are then no longer needed:
   a result with texts is never handed out as it is (see instantiate). */
static pd__split_status_t split_result(tmpl_t *t, pd_sql_result_t *res)
{
    pd__split_status_t st = PD__SPLIT_OK;
    if (res->sql != NULL)
        st = pd__split_make(res->sql, t->nlits, &t->sql);
    if (st == PD__SPLIT_OK && res->shadow_sql != NULL)
        st = pd__split_make(res->shadow_sql, t->nlits, &t->shadow);
    if (st == PD__SPLIT_OK) {
        free(res->sql);
        free(res->shadow_sql);
        res->sql = res->shadow_sql = NULL;
    }
    return st;
}

/* Rewrites the template of job->sql. Returns an unusable template (result NULL) when it
   cannot stand for its statements, NULL only when out of memory. */
static tmpl_t *make_template(job_t *job, const pd__lits_t *lits)
{
    tmpl_t *t = calloc(1, sizeof *t);
    if (t == NULL)
        return NULL;
    t->nlits = lits->n;
    t->at = malloc(lits->n * sizeof *t->at);
    if (t->at == NULL) {
        release_tmpl(t);
        return NULL;
    }
    memcpy(t->at, lits->at, lits->n * sizeof *t->at);
    if (!pd__lits_verify(lits) || !statement_parses(job->rw, job->sql))
        return t;
    const char *sql = job->sql;
    job->sql = lits->tmpl.buf;
    job->templating = true;
    job->untemplatable = false;
    pd_sql_result_t *res = compute(job);
    job->sql = sql;
    job->templating = false;
    /* "Nested too deeply" from the passes counts depth, and a negative literal is one node
       deeper in a template (- $1) than in its statement (the constant -1). */
    if (job->untemplatable ||
        (res != NULL && res->action == PD_SQL_REFUSE && strcmp(res->sqlstate, "54001") == 0)) {
        pd_sql_result_release(res);
        return t;
    }
    if (res == NULL) {
        release_tmpl(t);
        return NULL;
    }
    pd__split_status_t st = split_result(t, res);
    if (st == PD__SPLIT_OK) {
        t->result = res;
    } else {
        pd_sql_result_release(res);
        if (st == PD__SPLIT_OOM) {
            release_tmpl(t);
            return NULL;
        }
    }
    return t;
}

/* The statement's literals are where the template's were: same text and kinds (the key)
   with $i elsewhere would be another reading of the same template text. */
static bool usable(const tmpl_t *t, const pd__lits_t *lits)
{
    return t->result != NULL && t->nlits == lits->n &&
           memcmp(t->at, lits->at, lits->n * sizeof *t->at) == 0;
}

/* The mirror plan of a template's result, for a result made from it (the plan does not
   depend on the literals: row images are built from the catalog, not the text). */
static bool copy_mirror(pd_sql_result_t *r, const pd_sql_result_t *tr)
{
    r->mirror = tr->mirror;
    r->mirror_rule = tr->mirror_rule;
    r->read_new = tr->read_new;
    r->mirror_original = tr->mirror_original;
    r->txn = tr->txn;
    r->txn_commit = tr->txn_commit;
    r->set_local = tr->set_local;
    r->image = tr->image;
    r->image_cols = tr->image_cols;
    r->client_cols = tr->client_cols;
    r->image_nkey = tr->image_nkey;
    if (tr->image_sql != NULL && (r->image_sql = strdup(tr->image_sql)) == NULL)
        return false;
    if (tr->image_table != NULL && (r->image_table = strdup(tr->image_table)) == NULL)
        return false;
    if (tr->image_types != NULL) {
        r->image_types = malloc((tr->image_cols + 1) * sizeof *r->image_types);
        if (r->image_types == NULL)
            return false;
        memcpy(r->image_types, tr->image_types, tr->image_cols * sizeof *r->image_types);
    }
    if (tr->image_key != NULL) {
        r->image_key = malloc((tr->image_nkey + 1) * sizeof *r->image_key);
        if (r->image_key == NULL)
            return false;
        memcpy(r->image_key, tr->image_key, tr->image_nkey * sizeof *r->image_key);
    }
    return true;
}

/* The statement's result from its template: a refusal and a pass without a shadow form are
   the same for every statement of the shape and shared; texts are filled in. */
static pd_sql_result_t *instantiate(tmpl_t *t, const char *sql, const pd__lits_t *lits)
{
    pd_sql_result_t *tr = t->result;
    if (tr->action == PD_SQL_REFUSE || (tr->action == PD_SQL_PASS && t->shadow.text == NULL)) {
        tr->refs++;
        return tr;
    }
    pd_sql_result_t *r = new_result(tr->action);
    if (r == NULL)
        return NULL;
    r->ordered = tr->ordered;
    r->is_write = tr->is_write;
    r->rule = tr->rule;
    if (!copy_mirror(r, tr)) {
        pd_sql_result_release(r);
        return NULL;
    }
    if ((t->sql.text != NULL && (r->sql = pd__split_fill(&t->sql, sql, lits)) == NULL) ||
        (t->shadow.text != NULL &&
         (r->shadow_sql = pd__split_fill(&t->shadow, sql, lits)) == NULL)) {
        pd_sql_result_release(r);
        return NULL;
    }
    return r;
}

/* The template path after an exact-text miss. Sets *done when it answered (with a result,
   or NULL when out of memory); leaves it false when the statement takes the exact path. */
static pd_sql_result_t *rewrite_templated(job_t *job, bool *done)
{
    pd_sql_t *rw = job->rw;
    pd__lits_t lits;
    /* Plain text has its literals found without the lexer, to look the template up; a
       template is only ever made from the lexer's reading (pd__lits_take_plain). */
    bool plain = pd__lits_take_plain(job->sql, &lits) == PD__LITS_OK;
    pd__lits_status_t st = plain ? PD__LITS_OK : pd__lits_take(job->sql, &lits);
    if (st != PD__LITS_OK) {
        *done = st == PD__LITS_OOM;
        return NULL;
    }
    pd_sql_result_t *res = NULL;
    size_t len = 0;
    char *key = NULL;
    if (lits.tmpl.len > CACHE_MAX_SQL ||
        (key = cache_key(job, 'T', lits.tmpl.buf, lits.tmpl.len, lits.kinds, &len)) == NULL) {
        *done = key == NULL && lits.tmpl.len <= CACHE_MAX_SQL;
        pd__lits_free(&lits);
        return NULL;
    }
    uint64_t hash = pd__cache_hash(key, len);
    tmpl_t *t = pd__cache_get(&rw->cache, key, len, hash);
    if (t == NULL && plain) {
        /* The lexer's reading is the same (same key), with what making a template needs. */
        pd__lits_free(&lits);
        if ((st = pd__lits_take(job->sql, &lits)) != PD__LITS_OK) {
            free(key);
            *done = st == PD__LITS_OOM;
            return NULL;
        }
    }
    if (t != NULL) {
        free(key);
        if (usable(t, &lits)) {
            rw->stats.template_hits++;
            res = instantiate(t, job->sql, &lits);
            *done = true;
        } else {
            rw->stats.template_unusable++;
        }
    } else {
        rw->stats.template_misses++;
        t = make_template(job, &lits);
        if (t == NULL) {
            free(key);
            *done = true;
        } else {
            /* Before the put, which releases the template when it cannot keep it. */
            if (t->result != NULL) {
                res = instantiate(t, job->sql, &lits);
                *done = true;
            } else {
                rw->stats.template_unusable++;
            }
            pd__cache_put(&rw->cache, key, len, hash, t, release_tmpl);
        }
    }
    pd__lits_free(&lits);
    return res;
}

static pd_sql_result_t *rewrite_cached(job_t *job)
{
    pd_sql_t *rw = job->rw;
    size_t sqllen = strlen(job->sql);
    if (!rw->caching || sqllen > CACHE_MAX_SQL) {
        rw->stats.misses++;
        return compute(job);
    }
    size_t len = 0;
    char *key = cache_key(job, 'X', job->sql, sqllen, "", &len);
    if (key == NULL)
        return NULL;
    uint64_t hash = pd__cache_hash(key, len);
    pd_sql_result_t *hit = pd__cache_get(&rw->cache, key, len, hash);
    if (hit != NULL) {
        rw->stats.hits++;
        hit->refs++;
        free(key);
        return hit;
    }
    rw->stats.misses++;
    bool done = false;
    pd_sql_result_t *res = rw->templating ? rewrite_templated(job, &done) : NULL;
    if (done) {
        free(key);
        return res;
    }
    res = compute(job);
    if (res == NULL) {
        free(key);
        return NULL;
    }
    res->refs++; /* the cache's reference */
    pd__cache_put(&rw->cache, key, len, hash, res, release_result);
    return res;
}

pd_sql_result_t *pd_sql_rewrite(pd_sql_t *rw, const char *database, const char *sql,
                                const pd_rule_view_t *views)
{
    if (database == NULL)
        database = "";
    if (sql == NULL || !may_concern_rule(rw, database, sql, views)) {
        rw->stats.skipped_unparsed++;
        rw->pass->refs++;
        return rw->pass;
    }
    unsigned n = rw->nrules + 1;
    bool *in_db = calloc(n, sizeof *in_db);
    pd_rule_view_t *primary = calloc(n, sizeof *primary);
    pd_rule_view_t *shadow = calloc(n, sizeof *shadow);
    pd_rule_view_t *given = views != NULL ? NULL : calloc(n, sizeof *given);
    pd_sql_result_t *res = NULL;
    if (in_db != NULL && primary != NULL && shadow != NULL && (views != NULL || given != NULL)) {
        if (given != NULL)
            configured_views(rw, given);
        job_t job = {.rw = rw,
                     .database = database,
                     .sql = sql,
                     .views = views != NULL ? views : given,
                     .in_db = in_db,
                     .primary = primary,
                     .shadow = shadow};
        resolve_views(&job);
        res = rewrite_cached(&job);
    }
    free(in_db);
    free(primary);
    free(shadow);
    free(given);
    return res;
}

/* ---------------------------------------------------------------------------------------
 * Normalization for logs.
 */
#define UNPARSEABLE "<unparseable statement>"

/* Replaces the literal tokens of norm with $n, numbered after its highest $n. */
static char *mask_tokens(const char *norm, pd__scan_t *scan)
{
    long next = 1;
    pd__token_t tok;
    while (pd__scan_next(scan, &tok))
        if (tok.token == PG_QUERY__TOKEN__PARAM) {
            long p = strtol(norm + tok.start + 1, NULL, 10);
            next = p >= next ? p + 1 : next;
        }
    pd__scan_rewind(scan);
    pd__text_t t = {0};
    size_t at = 0;
    while (pd__scan_next(scan, &tok)) {
        if (!pd__is_literal_token(tok.token) || tok.start < at)
            continue;
        char param[32];
        int n = snprintf(param, sizeof param, "$%ld", next++);
        pd__text_add(&t, norm + at, tok.start - at);
        pd__text_add(&t, param, (size_t)n);
        at = tok.end;
    }
    pd__text_add(&t, norm + at, strlen(norm + at));
    if (!t.oom && !scan->bad)
        return t.buf;
    free(t.buf);
    return scan->bad ? strdup(UNPARSEABLE) : NULL;
}

/* pg_query_normalize leaves literals where the grammar keeps them outside expressions
   (COPY file names, DDL defaults, typmods, ORDER BY positions...). Logs must carry none, so
   whatever literal tokens remain are masked too. A normalized text that no longer scans
   (pg_query_normalize can glue a $n to the next word) gives the placeholder rather than
   risk a literal. NULL only when out of memory. */
static char *mask_remaining(const char *norm)
{
    pd__scan_t scan;
    if (!pd__scan_open(&scan, norm))
        return strdup(UNPARSEABLE);
    char *out = mask_tokens(norm, &scan);
    pd__scan_close(&scan);
    return out;
}

char *pd_sql_normalize(const char *sql)
{
    PgQueryNormalizeResult nr = pg_query_normalize(sql != NULL ? sql : "");
    char *out = NULL;
    if (nr.error == NULL && nr.normalized_query != NULL)
        out = mask_remaining(nr.normalized_query);
    else
        out = strdup(UNPARSEABLE);
    pg_query_free_normalize_result(nr);
    return out;
}

char **pd_sql_deallocated_names(const char *sql)
{
    PgQuery__ParseResult *tree = pd__parse_tree(sql);
    if (tree == NULL)
        return NULL;
    char **names = calloc(tree->n_stmts + 1, sizeof *names);
    size_t n = 0;
    for (size_t i = 0; names != NULL && i < tree->n_stmts; i++) {
        const PgQuery__Node *st = tree->stmts[i]->stmt;
        if (st == NULL || st->node_case != PG_QUERY__NODE__NODE_DEALLOCATE_STMT ||
            st->deallocate_stmt->name == NULL || st->deallocate_stmt->name[0] == '\0')
            continue;
        if ((names[n] = strdup(st->deallocate_stmt->name)) == NULL) {
            pd_sql_names_free(names);
            names = NULL;
            break;
        }
        n++;
    }
    if (names != NULL && n == 0) {
        free(names);
        names = NULL;
    }
    pg_query__parse_result__free_unpacked(tree, NULL);
    return names;
}

void pd_sql_names_free(char **names)
{
    for (size_t i = 0; names != NULL && names[i] != NULL; i++)
        free(names[i]);
    free(names);
}
