/*
 * sql_write.c — classification of statements (which rule tables they name, whether they
 * write one) and the write rewriting of writes=dual / dual-new: every INSERT, UPDATE,
 * ON CONFLICT DO UPDATE and MERGE action that assigns one column of a rule's pair also
 * assigns the other, through the rule's up or down template with the values being written
 * substituted for its column references. What cannot be kept in step faithfully is
 * refused (COPY FROM, SET (...) = (SELECT ...), volatile values, DO blocks, ...).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "rules/sql_internal.h"

/* ---------------------------------------------------------------------------------------
 * Classification.
 */
static void touch(pd__ctx_t *ctx, const PgQuery__RangeVar *rv, bool write)
{
    if (rv == NULL)
        return;
    for (unsigned i = 0; i < ctx->nrules; i++) {
        if (!ctx->in_db[i] || !pd__rule_matches(&ctx->rules[i], rv))
            continue;
        if (ctx->rule < 0 || (int)i < ctx->rule)
            ctx->rule = (int)i;
        ctx->is_write = ctx->is_write || write;
        return;
    }
}

static bool classify_node(pd__node_t *n, void *arg)
{
    pd__ctx_t *ctx = arg;
    switch (n->node_case) {
    case PG_QUERY__NODE__NODE_RANGE_VAR:
        touch(ctx, n->range_var, false);
        break;
    case PG_QUERY__NODE__NODE_INSERT_STMT:
        touch(ctx, n->insert_stmt->relation, true);
        break;
    case PG_QUERY__NODE__NODE_UPDATE_STMT:
        touch(ctx, n->update_stmt->relation, true);
        break;
    case PG_QUERY__NODE__NODE_DELETE_STMT:
        touch(ctx, n->delete_stmt->relation, true);
        break;
    case PG_QUERY__NODE__NODE_MERGE_STMT:
        touch(ctx, n->merge_stmt->relation, true);
        break;
    case PG_QUERY__NODE__NODE_COPY_STMT:
        touch(ctx, n->copy_stmt->relation, n->copy_stmt->is_from);
        break;
    default:
        break;
    }
    return true;
}

static void refuse_too_deep(pd__ctx_t *ctx)
{
    pd__refuse(ctx, ctx->rule, "54001", "Split the statement into simpler ones.",
               "pgdual: the statement is nested too deeply to be examined");
}

void pd__classify(pd__ctx_t *ctx, pd__node_t *stmt)
{
    if (stmt != NULL && !pd__walk(&stmt->base, classify_node, ctx))
        refuse_too_deep(ctx);
}

/* ---------------------------------------------------------------------------------------
 * Refusals of writes: every message names the table, the rule and its writes flag.
 */
#define refuse_write(ctx, r, hint, ...) pd__refuse_rule(ctx, r, hint, false, __VA_ARGS__)

static void refuse_template(pd__ctx_t *ctx, const pd__rule_t *r, bool up, const char *target)
{
    char hint[160];
    snprintf(hint, sizeof hint, "Fix the %s expression of rule %s in the configuration and reload.",
             up ? "up" : "down", r->cfg->name);
    pd__refuse(ctx, r->index, "F0000", hint,
               "pgdual: the %s expression of rule \"%s\" does not parse, so \"%s\" cannot be "
               "derived from it",
               up ? "up" : "down", r->cfg->name, target);
}

static const char *catalog_hint =
    "Write the value explicitly, or check that pgdual could read the catalog (pgdualctl rules).";

/* ---------------------------------------------------------------------------------------
 * Substitution of assigned values into a template.
 */
typedef enum { SUB_VALUE, SUB_KEEP, SUB_FAIL } sub_kind_t;

typedef struct {
    pd__ctx_t *ctx;
    const pd__assign_t *a;
    const char *target; /* the column being derived, for messages */
    bool failed;
} subst_t;

static sub_kind_t checked_value(subst_t *s, const char *col, const pd__node_t *v,
                                const pd__node_t **out)
{
    const char *fname = NULL;
    if (pd__calls_volatile(v, &fname)) {
        char hint[200];
        snprintf(hint, sizeof hint,
                 "Compute the value of %s in the application or pass it as a parameter.", col);
        refuse_write(s->ctx, s->a->rule, hint,
                     "the value written to \"%s\" of \"%s\" calls %s(), which would give \"%s\" a "
                     "different value",
                     col, pd__rule_table(s->a->rule), fname, s->target);
        return SUB_FAIL;
    }
    *out = v;
    return SUB_VALUE;
}

static sub_kind_t default_value(subst_t *s, const char *col, const pd__node_t **out)
{
    bool known = false;
    const pd__node_t *d = pd__rule_default(s->ctx, s->a->rule, col, &known);
    if (!known) {
        refuse_write(s->ctx, s->a->rule, catalog_hint,
                     "the default of column \"%s\" of \"%s\" is not known, so \"%s\" cannot be "
                     "derived from it",
                     col, pd__rule_table(s->a->rule), s->target);
        return SUB_FAIL;
    }
    return checked_value(s, col, d, out);
}

static sub_kind_t lookup(subst_t *s, const char *col, const pd__node_t **out)
{
    const pd__assign_t *a = s->a;
    for (size_t i = 0; i < a->n; i++) {
        if (strcmp(a->names[i], col) != 0)
            continue;
        const pd__node_t *v = a->values[i];
        if (v == NULL) {
            char hint[200];
            snprintf(hint, sizeof hint,
                     "Assign %s on its own (SET %s = (SELECT ...)) or from a row of expressions.",
                     col, col);
            refuse_write(s->ctx, a->rule, hint,
                         "UPDATE \"%s\" SET (%s, ...) = (SELECT ...) cannot be rewritten to set "
                         "\"%s\" too",
                         pd__rule_table(a->rule), col, s->target);
            return SUB_FAIL;
        }
        if (v->node_case == PG_QUERY__NODE__NODE_SET_TO_DEFAULT)
            return default_value(s, col, out);
        return checked_value(s, col, v, out);
    }
    return a->insert ? default_value(s, col, out) : SUB_KEEP;
}

static bool subst_visit(pd__node_t *n, void *arg)
{
    subst_t *s = arg;
    if (s->failed || pd__stopped(s->ctx))
        return false;
    const char *col = pd__plain_ref(n);
    if (col == NULL)
        return true;
    const pd__node_t *value = NULL;
    switch (lookup(s, col, &value)) {
    case SUB_FAIL:
        s->failed = true;
        return false;
    case SUB_KEEP:
        /* The current row's value; qualified when another relation is in scope. */
        if (s->a->qual != NULL && !pd__insert(&n->column_ref->fields, &n->column_ref->n_fields, 0,
                                              pd__make_string(s->a->qual)))
            s->failed = !pd__oom(s->ctx);
        return false;
    case SUB_VALUE:
        break;
    }
    pd__node_t *copy = pd__node_copy(value);
    if (copy == NULL) {
        s->failed = !pd__oom(s->ctx);
        return false;
    }
    pd__node_become(n, copy);
    return false; /* the value is the statement's own: not to be substituted again */
}

/* A copy of tmpl with the assigned values in place of its column references, or NULL
   (refused or out of memory, recorded in ctx). */
static pd__node_t *substitute(pd__ctx_t *ctx, const pd__node_t *tmpl, const pd__assign_t *a,
                              const char *target)
{
    pd__node_t *copy = pd__node_copy(tmpl);
    if (copy == NULL) {
        pd__oom(ctx);
        return NULL;
    }
    subst_t s = {ctx, a, target, false};
    if (!pd__walk(&copy->base, subst_visit, &s))
        refuse_too_deep(ctx);
    if (s.failed || pd__stopped(ctx)) {
        pd__node_free(copy);
        return NULL;
    }
    return copy;
}

/* ---------------------------------------------------------------------------------------
 * Which partner columns a write needs.
 */
typedef enum { COL_ABSENT, COL_DEFAULTED, COL_EXPLICIT } col_status_t;

typedef struct {
    const char *target;     /* the column to add */
    const pd__node_t *tmpl; /* up or down */
    long replace;           /* a translator's: the old column's position it takes, else -1 */
} add_t;

static bool has_name(const char **names, size_t n, const char *col)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(names[i], col) == 0)
            return true;
    return false;
}

/* An INSERT that leaves out a column with a default (other than NULL) assigns that
   default, which the partner column must then follow. */
static col_status_t status(const pd__rule_t *r, const char **names, size_t n, bool insert,
                           const char *col)
{
    if (has_name(names, n, col))
        return COL_EXPLICIT;
    return insert && pd__rule_has_default(r, col) ? COL_DEFAULTED : COL_ABSENT;
}

/* Fills adds[] (room for every pair) and returns how many; -1 when refused. A statement
   assigning both columns of a pair, or neither, is left alone. */
static int plan_adds(pd__ctx_t *ctx, const pd__rule_t *r, const char **names, size_t n, bool insert,
                     add_t *adds)
{
    int count = 0;
    if (r->xlate) {
        /* New has only the new column: an assignment of the old one becomes one of the new
           one. An old column left out is left to new's own default. */
        for (unsigned i = 0; i < r->npairs; i++)
            for (size_t k = 0; k < n; k++) {
                if (strcmp(names[k], r->pairs[i].old) != 0)
                    continue;
                if (r->pairs[i].up == NULL) {
                    refuse_template(ctx, r, true, r->pairs[i].new);
                    return -1;
                }
                adds[count++] = (add_t){r->pairs[i].new, r->pairs[i].up, (long)k};
                break;
            }
        return count;
    }
    for (unsigned i = 0; i < r->npairs; i++) {
        const pd__pair_t *p = &r->pairs[i];
        col_status_t o = status(r, names, n, insert, p->old);
        col_status_t nw = status(r, names, n, insert, p->new);
        bool up;
        if (o == COL_EXPLICIT && nw == COL_EXPLICIT)
            continue;
        if (o == COL_EXPLICIT || (o == COL_DEFAULTED && nw == COL_ABSENT))
            up = true;
        else if (nw == COL_EXPLICIT || (nw == COL_DEFAULTED && o == COL_ABSENT))
            up = false;
        else
            continue;
        const pd__node_t *tmpl = up ? p->up : p->down;
        if (tmpl == NULL) {
            refuse_template(ctx, r, up, up ? p->new : p->old);
            return -1;
        }
        adds[count++] = (add_t){up ? p->new : p->old, tmpl, -1};
    }
    return count;
}

static bool is_rule_column(const pd__rule_t *r, const char *col)
{
    for (unsigned i = 0; i < r->npairs; i++)
        if (strcmp(r->pairs[i].old, col) == 0 || strcmp(r->pairs[i].new, col) == 0)
            return true;
    return false;
}

/* The column names of a list of ResTargets (INSERT columns, SET targets). Refuses an
   assignment to part of a rule column: its partner cannot follow a subscript. */
static const char **target_names(pd__ctx_t *ctx, const pd__rule_t *r, pd__node_t **list, size_t n)
{
    const char **names = calloc(n + 1, sizeof *names);
    if (names == NULL) {
        pd__oom(ctx);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        const PgQuery__ResTarget *rt =
            list[i]->node_case == PG_QUERY__NODE__NODE_RES_TARGET ? list[i]->res_target : NULL;
        names[i] = rt != NULL && rt->name != NULL ? rt->name : "";
        if (rt != NULL && rt->n_indirection > 0 && is_rule_column(r, names[i])) {
            refuse_write(ctx, r, "Assign the whole column.",
                         "assigning to part of column \"%s\" of \"%s\" (a subscript or field) is "
                         "not supported",
                         names[i], pd__rule_table(r));
            free(names);
            return NULL;
        }
    }
    return names;
}

static bool add_targets(pd__ctx_t *ctx, pd__node_t ***list, size_t *n, const add_t *adds, int nadds)
{
    for (int i = 0; i < nadds; i++)
        if (!pd__append(list, n, pd__make_res_target(adds[i].target, NULL)))
            return pd__oom(ctx);
    return true;
}

/* Appends the derived values of one row (VALUES row, SELECT list or MERGE values). */
static bool add_values(pd__ctx_t *ctx, const pd__assign_t *a, const add_t *adds, int nadds,
                       pd__node_t ***list, size_t *n, bool as_targets)
{
    for (int i = 0; i < nadds; i++) {
        pd__node_t *e = substitute(ctx, adds[i].tmpl, a, adds[i].target);
        if (e == NULL)
            return false;
        if (as_targets)
            e = pd__make_res_target(NULL, e);
        if (!pd__append(list, n, e))
            return pd__oom(ctx);
    }
    return true;
}

/* A translator's row: each old column's value (a->values, in place) becomes the new
   column's, through `up` (DEFAULT stays DEFAULT: new's own). Every value is derived before
   any is replaced, since a template may read several of them. */
static bool replace_values(pd__ctx_t *ctx, const pd__assign_t *a, const add_t *adds, int nadds)
{
    pd__node_t *const *slots = a->values;
    pd__node_t *made[nadds > 0 ? nadds : 1];
    bool ok = true;
    for (int i = 0; i < nadds; i++) {
        /* A row shorter than the column list is the server's error to report. */
        const pd__node_t *v = (size_t)adds[i].replace < a->n ? slots[adds[i].replace] : NULL;
        made[i] = NULL;
        if (!ok || v == NULL || v->node_case == PG_QUERY__NODE__NODE_SET_TO_DEFAULT)
            continue;
        made[i] = substitute(ctx, adds[i].tmpl, a, adds[i].target);
        ok = made[i] != NULL;
    }
    for (int i = 0; i < nadds; i++) {
        if (ok && made[i] != NULL)
            pd__node_become(slots[adds[i].replace], made[i]);
        else
            pd__node_free(made[i]);
    }
    return ok;
}

/* The derived values of one row: appended after it, or (a translator) put in place of the
   old columns' values. */
static void derive_values(pd__ctx_t *ctx, const pd__assign_t *a, const add_t *adds, int nadds,
                          pd__node_t ***list, size_t *n, bool as_targets)
{
    if (a->rule->xlate)
        (void)replace_values(ctx, a, adds, nadds);
    else
        add_values(ctx, a, adds, nadds, list, n, as_targets);
}

/* The translator's renames in a target list (INSERT columns, SET targets). */
static bool rename_targets(pd__ctx_t *ctx, pd__node_t **list, const add_t *adds, int nadds)
{
    for (int i = 0; i < nadds; i++) {
        PgQuery__ResTarget *rt = list[adds[i].replace]->res_target;
        char *name = strdup(adds[i].target);
        if (name == NULL)
            return pd__oom(ctx);
        free(rt->name);
        rt->name = name;
    }
    return true;
}

/* ---------------------------------------------------------------------------------------
 * UPDATE SET lists (UPDATE, ON CONFLICT DO UPDATE, MERGE ... UPDATE).
 */
/* The value a SET entry assigns: its expression, the matching member of a row assigned
   with SET (a, b) = (x, y), or NULL for a sub-SELECT. */
static pd__node_t *set_value(const PgQuery__ResTarget *rt)
{
    if (rt->val == NULL || rt->val->node_case != PG_QUERY__NODE__NODE_MULTI_ASSIGN_REF)
        return rt->val;
    const PgQuery__MultiAssignRef *m = rt->val->multi_assign_ref;
    if (m->source == NULL || m->source->node_case != PG_QUERY__NODE__NODE_ROW_EXPR)
        return NULL;
    const PgQuery__RowExpr *row = m->source->row_expr;
    if (m->colno < 1 || (size_t)m->colno > row->n_args)
        return NULL;
    return row->args[m->colno - 1];
}

/* EXCLUDED.col, or NULL. */
static const char *excluded_ref(const pd__node_t *n)
{
    if (n == NULL || n->node_case != PG_QUERY__NODE__NODE_COLUMN_REF ||
        n->column_ref->n_fields != 2)
        return NULL;
    const char *q = pd__str(n->column_ref->fields[0]);
    return q != NULL && strcmp(q, "excluded") == 0 ? pd__str(n->column_ref->fields[1]) : NULL;
}

typedef struct {
    pd__ctx_t *ctx;
    const pd__rule_t *rule;
    const char *found; /* an old column read through EXCLUDED, transformed on new */
} excl_t;

/* EXCLUDED.o of a column new only renames becomes EXCLUDED.n (the proposed row holds the
   value itself); of a transformed one, it is found. */
static bool translate_excluded_ref(pd__node_t *n, void *arg)
{
    excl_t *e = arg;
    const char *col = excluded_ref(n);
    for (unsigned i = 0; col != NULL && i < e->rule->npairs; i++) {
        const pd__pair_t *p = &e->rule->pairs[i];
        if (strcmp(col, p->old) != 0)
            continue;
        const char *plain = pd__plain_ref(p->up);
        if (plain == NULL || strcmp(plain, p->old) != 0) {
            e->found = col;
            return false;
        }
        pd__node_t *ref = pd__make_column_ref("excluded", p->new);
        if (ref == NULL) {
            pd__oom(e->ctx);
            return false;
        }
        pd__node_become(n, ref);
        e->ctx->changed = true;
        break;
    }
    return true;
}

/*
 * ON CONFLICT DO UPDATE under a translator: `SET o = EXCLUDED.o` becomes `SET n =
 * EXCLUDED.n` (the proposed row already holds up() of the value), and so does any other
 * reading of a column new only renames; reading a transformed column through EXCLUDED
 * has no counterpart on new and is refused.
 */
static void translate_excluded(pd__ctx_t *ctx, const pd__rule_t *r, PgQuery__OnConflictClause *oc)
{
    for (size_t i = 0; i < oc->n_target_list; i++) {
        pd__node_t *t = oc->target_list[i];
        if (t->node_case != PG_QUERY__NODE__NODE_RES_TARGET || t->res_target->name == NULL)
            continue;
        const char *col = excluded_ref(t->res_target->val);
        for (unsigned k = 0; col != NULL && k < r->npairs; k++) {
            const pd__pair_t *p = &r->pairs[k];
            if (strcmp(col, p->old) != 0 || strcmp(t->res_target->name, p->old) != 0)
                continue;
            pd__node_t *ref = pd__make_column_ref("excluded", p->new);
            char *name = strdup(p->new);
            if (ref == NULL || name == NULL) {
                pd__node_free(ref);
                free(name);
                pd__oom(ctx);
                return;
            }
            pd__node_become(t->res_target->val, ref);
            free(t->res_target->name);
            t->res_target->name = name;
            ctx->changed = true;
            break;
        }
    }
    excl_t e = {ctx, r, NULL};
    for (size_t i = 0; i < oc->n_target_list && e.found == NULL && !pd__stopped(ctx); i++)
        if (!pd__walk(&oc->target_list[i]->base, translate_excluded_ref, &e))
            break;
    if (e.found == NULL && !pd__stopped(ctx) && oc->where_clause != NULL)
        (void)pd__walk(&oc->where_clause->base, translate_excluded_ref, &e);
    if (pd__stopped(ctx))
        return;
    if (e.found != NULL) {
        char hint[200];
        snprintf(hint, sizeof hint, "Assign it as %s = EXCLUDED.%s, or name the value itself.",
                 e.found, e.found);
        refuse_write(ctx, r, hint,
                     "ON CONFLICT DO UPDATE reading EXCLUDED.%s of \"%s\" cannot be translated "
                     "for new, where the column is renamed or transformed",
                     e.found, pd__rule_table(r));
    }
}

/* An inference clause naming an old column: renamed for new; one transformed by `up` has
   no unique index to match on new. */
static void translate_conflict_target(pd__ctx_t *ctx, const pd__rule_t *r,
                                      PgQuery__InferClause *inf)
{
    for (size_t i = 0; inf != NULL && i < inf->n_index_elems; i++) {
        pd__node_t *n = inf->index_elems[i];
        if (n->node_case != PG_QUERY__NODE__NODE_INDEX_ELEM || n->index_elem->name == NULL)
            continue;
        for (unsigned k = 0; k < r->npairs; k++) {
            const pd__pair_t *p = &r->pairs[k];
            if (strcmp(n->index_elem->name, p->old) != 0)
                continue;
            const char *plain = pd__plain_ref(p->up);
            if (plain == NULL || strcmp(plain, p->old) != 0) {
                refuse_write(ctx, r, "Name a conflict target of columns new only renames.",
                             "ON CONFLICT (%s) on \"%s\" cannot be translated for new, where "
                             "the column is transformed",
                             p->old, pd__rule_table(r));
                return;
            }
            char *name = strdup(p->new);
            if (name == NULL) {
                pd__oom(ctx);
                return;
            }
            free(n->index_elem->name);
            n->index_elem->name = name;
            ctx->changed = true;
        }
    }
}

static void translate_set_list(pd__ctx_t *ctx, const pd__assign_t *a, const add_t *adds, int nadds,
                               pd__node_t **list)
{
    for (int i = 0; i < nadds; i++)
        if (a->values[adds[i].replace] == NULL) {
            char hint[200];
            snprintf(hint, sizeof hint, "Assign %s on its own (SET %s = (SELECT ...)).",
                     a->names[adds[i].replace], a->names[adds[i].replace]);
            refuse_write(ctx, a->rule, hint,
                         "UPDATE \"%s\" SET (%s, ...) = (SELECT ...) cannot be translated for "
                         "new, where the column is renamed or transformed",
                         pd__rule_table(a->rule), a->names[adds[i].replace]);
            return;
        }
    if (replace_values(ctx, a, adds, nadds))
        rename_targets(ctx, list, adds, nadds);
}

static void rewrite_set_list(pd__ctx_t *ctx, const pd__rule_t *r, pd__node_t ***list, size_t *n,
                             const char *qual)
{
    const char **names = target_names(ctx, r, *list, *n);
    if (names == NULL)
        return;
    add_t *adds = calloc(r->npairs + 1, sizeof *adds);
    pd__node_t **values = calloc(*n + 1, sizeof *values);
    if (adds == NULL || values == NULL) {
        pd__oom(ctx);
    } else {
        for (size_t i = 0; i < *n; i++)
            if ((*list)[i]->node_case == PG_QUERY__NODE__NODE_RES_TARGET)
                values[i] = set_value((*list)[i]->res_target);
        int nadds = plan_adds(ctx, r, names, *n, false, adds);
        pd__assign_t a = {r, names, values, *n, false, qual};
        size_t orig = *n;
        if (r->xlate && nadds > 0)
            translate_set_list(ctx, &a, adds, nadds, *list);
        for (int i = 0; !r->xlate && i < nadds && !pd__stopped(ctx); i++) {
            pd__node_t *e = substitute(ctx, adds[i].tmpl, &a, adds[i].target);
            if (e != NULL && !pd__append(list, n, pd__make_res_target(adds[i].target, e)))
                pd__oom(ctx);
            a.n = orig; /* the list may have moved: names/values still describe the old part */
        }
        ctx->changed = ctx->changed || nadds > 0;
    }
    free(values);
    free(adds);
    free(names);
}

/* ---------------------------------------------------------------------------------------
 * INSERT.
 */
static bool has_star_target(const PgQuery__SelectStmt *s)
{
    for (size_t i = 0; i < s->n_target_list; i++) {
        const pd__node_t *t = s->target_list[i];
        if (t->node_case == PG_QUERY__NODE__NODE_RES_TARGET && t->res_target->val != NULL &&
            t->res_target->val->node_case == PG_QUERY__NODE__NODE_COLUMN_REF &&
            pd__is_star(t->res_target->val->column_ref))
            return true;
    }
    return false;
}

static bool is_setop(const PgQuery__SelectStmt *s)
{
    return s->op != PG_QUERY__SET_OPERATION__SETOP_NONE &&
           s->op != PG_QUERY__SET_OPERATION__SET_OPERATION_UNDEFINED;
}

/* How many values each row of the source gives; -1 when a `*` hides it. */
static long source_width(const PgQuery__SelectStmt *s)
{
    while (is_setop(s) && s->larg != NULL)
        s = s->larg;
    if (s->n_values_lists > 0) {
        const pd__node_t *row = s->values_lists[0];
        return row->node_case == PG_QUERY__NODE__NODE_LIST ? (long)row->list->n_items : -1;
    }
    return has_star_target(s) ? -1 : (long)s->n_target_list;
}

typedef struct {
    const pd__rule_t *r;
    const char **names;
    size_t n;
    const add_t *adds;
    int nadds;
} fill_t;

static void fill_source(pd__ctx_t *ctx, const fill_t *f, PgQuery__SelectStmt *s);

static void fill_values(pd__ctx_t *ctx, const fill_t *f, PgQuery__SelectStmt *s)
{
    for (size_t i = 0; i < s->n_values_lists && !pd__stopped(ctx); i++) {
        pd__node_t *row = s->values_lists[i];
        if (row->node_case != PG_QUERY__NODE__NODE_LIST)
            continue;
        size_t n = row->list->n_items < f->n ? row->list->n_items : f->n;
        pd__assign_t a = {f->r, f->names, row->list->items, n, true, NULL};
        /* Appending may move items; the assignment only reads its first n entries, which
           stay valid through a copy kept for the purpose. */
        pd__node_t **vals = malloc((n + 1) * sizeof *vals);
        if (vals == NULL) {
            pd__oom(ctx);
            return;
        }
        if (n > 0)
            memcpy(vals, row->list->items, n * sizeof *vals);
        a.values = vals;
        derive_values(ctx, &a, f->adds, f->nadds, &row->list->items, &row->list->n_items, false);
        free(vals);
    }
}

static void fill_targets(pd__ctx_t *ctx, const fill_t *f, PgQuery__SelectStmt *s)
{
    if (has_star_target(s)) {
        refuse_write(ctx, f->r, "List the columns in the SELECT.",
                     "INSERT into \"%s\" ... SELECT * is not supported: pgdual cannot tell which "
                     "value goes to which column",
                     pd__rule_table(f->r));
        return;
    }
    size_t n = s->n_target_list < f->n ? s->n_target_list : f->n;
    pd__node_t **vals = calloc(n + 1, sizeof *vals);
    if (vals == NULL) {
        pd__oom(ctx);
        return;
    }
    for (size_t i = 0; i < n; i++)
        if (s->target_list[i]->node_case == PG_QUERY__NODE__NODE_RES_TARGET)
            vals[i] = s->target_list[i]->res_target->val;
    pd__assign_t a = {f->r, f->names, vals, n, true, NULL};
    derive_values(ctx, &a, f->adds, f->nadds, &s->target_list, &s->n_target_list, true);
    free(vals);
}

/* Every branch of a set operation gets the derived values: each branch computes its own
   rows, and the extra column depends only on values of the same row. */
static void fill_source(pd__ctx_t *ctx, const fill_t *f, PgQuery__SelectStmt *s)
{
    if (is_setop(s)) {
        if (s->larg != NULL)
            fill_source(ctx, f, s->larg);
        if (s->rarg != NULL && !pd__stopped(ctx))
            fill_source(ctx, f, s->rarg);
        return;
    }
    if (s->n_values_lists > 0)
        fill_values(ctx, f, s);
    else
        fill_targets(ctx, f, s);
}

/* DEFAULT VALUES that must now name a derived column: a one-row VALUES. */
static pd__node_t *one_row_values(pd__ctx_t *ctx, const fill_t *f)
{
    PgQuery__SelectStmt *s = malloc(sizeof *s);
    if (s != NULL) {
        pg_query__select_stmt__init(s);
        s->op = PG_QUERY__SET_OPERATION__SETOP_NONE;
        s->limit_option = PG_QUERY__LIMIT_OPTION__LIMIT_OPTION_DEFAULT;
    }
    pd__node_t *sel = pd__node_wrap(PG_QUERY__NODE__NODE_SELECT_STMT, s);
    if (sel == NULL || !pd__append(&s->values_lists, &s->n_values_lists, pd__make_list())) {
        pd__node_free(sel);
        pd__oom(ctx);
        return NULL;
    }
    fill_values(ctx, f, s);
    if (pd__stopped(ctx)) {
        pd__node_free(sel);
        return NULL;
    }
    return sel;
}

/* The columns an INSERT without a column list assigns: the first `width` of the table. */
static const char **implicit_names(pd__ctx_t *ctx, const pd__rule_t *r, long width, size_t *n)
{
    if (!r->facts.loaded || width < 0) {
        refuse_write(ctx, r,
                     width < 0 ? "List the columns in the INSERT and in the SELECT."
                               : "Name the columns in the INSERT, or check that pgdual could "
                                 "read the catalog (pgdualctl rules).",
                     "INSERT into \"%s\" without a column list is not supported%s",
                     pd__rule_table(r),
                     width < 0 ? " when its values come from SELECT *"
                               : ": the table's columns are not known");
        return NULL;
    }
    *n = (size_t)width < r->facts.ncolumns ? (size_t)width : r->facts.ncolumns;
    const char **names = calloc(*n + 1, sizeof *names);
    if (names == NULL) {
        pd__oom(ctx);
        return NULL;
    }
    for (size_t i = 0; i < *n; i++)
        names[i] = r->facts.columns[i];
    return names;
}

static bool materialize_columns(pd__ctx_t *ctx, pd__node_t ***cols, size_t *ncols,
                                const char **names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!pd__append(cols, ncols, pd__make_res_target(names[i], NULL)))
            return pd__oom(ctx);
    return true;
}

/* Shared by INSERT and MERGE ... INSERT: cols are the target column list; `source` is the
   VALUES/SELECT of an INSERT, or NULL with merge_values for MERGE. */
typedef struct {
    pd__node_t ***cols;
    size_t *ncols;
    pd__node_t **source;        /* INSERT: select_stmt slot (NULL content: DEFAULT VALUES) */
    pd__node_t ***merge_values; /* MERGE: the values list */
    size_t *nmerge_values;
} insert_form_t;

static long insert_width(const insert_form_t *form)
{
    if (form->source != NULL)
        return *form->source != NULL &&
                       (*form->source)->node_case == PG_QUERY__NODE__NODE_SELECT_STMT
                   ? source_width((*form->source)->select_stmt)
                   : 0;
    return (long)*form->nmerge_values;
}

static void fill_insert(pd__ctx_t *ctx, const fill_t *f, const insert_form_t *form)
{
    if (form->merge_values != NULL) {
        pd__node_t **vals = calloc(*form->nmerge_values + 1, sizeof *vals);
        if (vals == NULL) {
            pd__oom(ctx);
            return;
        }
        if (*form->nmerge_values > 0)
            memcpy(vals, *form->merge_values, *form->nmerge_values * sizeof *vals);
        size_t n = *form->nmerge_values < f->n ? *form->nmerge_values : f->n;
        pd__assign_t a = {f->r, f->names, vals, n, true, NULL};
        derive_values(ctx, &a, f->adds, f->nadds, form->merge_values, form->nmerge_values, false);
        free(vals);
        return;
    }
    if (*form->source == NULL) {
        *form->source = one_row_values(ctx, f);
        return;
    }
    if ((*form->source)->node_case == PG_QUERY__NODE__NODE_SELECT_STMT)
        fill_source(ctx, f, (*form->source)->select_stmt);
}

static void rewrite_insert_form(pd__ctx_t *ctx, const pd__rule_t *r, const insert_form_t *form)
{
    long width = insert_width(form);
    /* Without a column list the values fill the table's first columns; a `*` source
       (width -1) hides how many. */
    bool implicit = *form->ncols == 0 && width != 0;
    size_t n = *form->ncols;
    const char **names = implicit ? implicit_names(ctx, r, width, &n)
                                  : target_names(ctx, r, *form->cols, *form->ncols);
    if (names == NULL)
        return;
    add_t *adds = calloc(r->npairs + 1, sizeof *adds);
    if (adds == NULL) {
        pd__oom(ctx);
        free(names);
        return;
    }
    int nadds = plan_adds(ctx, r, names, n, true, adds);
    if (nadds > 0) {
        fill_t f = {r, names, n, adds, nadds};
        /* Values first: they read the names, which materializing does not change. */
        fill_insert(ctx, &f, form);
        if (!pd__stopped(ctx) && implicit)
            materialize_columns(ctx, form->cols, form->ncols, names, n);
        if (!pd__stopped(ctx) && r->xlate)
            rename_targets(ctx, *form->cols, adds, nadds);
        else if (!pd__stopped(ctx))
            add_targets(ctx, form->cols, form->ncols, adds, nadds);
        ctx->changed = true;
    }
    free(adds);
    free(names);
}

static void rewrite_insert(pd__ctx_t *ctx, const pd__rule_t *r, PgQuery__InsertStmt *ins)
{
    insert_form_t form = {&ins->cols, &ins->n_cols, &ins->select_stmt, NULL, NULL};
    rewrite_insert_form(ctx, r, &form);
    PgQuery__OnConflictClause *oc = ins->on_conflict_clause;
    if (!pd__stopped(ctx) && oc != NULL && r->xlate)
        translate_conflict_target(ctx, r, oc->infer);
    if (pd__stopped(ctx) || oc == NULL ||
        oc->action != PG_QUERY__ON_CONFLICT_ACTION__ONCONFLICT_UPDATE)
        return;
    if (r->xlate)
        translate_excluded(ctx, r, oc);
    if (pd__stopped(ctx))
        return;
    /* EXCLUDED is in scope too: references to the existing row are qualified. */
    rewrite_set_list(ctx, r, &oc->target_list, &oc->n_target_list, pd__refname(ins->relation));
}

/* ---------------------------------------------------------------------------------------
 * UPDATE, MERGE, COPY, DO.
 */
static void rewrite_update(pd__ctx_t *ctx, const pd__rule_t *r, PgQuery__UpdateStmt *upd)
{
    const char *qual = upd->n_from_clause > 0 ? pd__refname(upd->relation) : NULL;
    rewrite_set_list(ctx, r, &upd->target_list, &upd->n_target_list, qual);
}

static void rewrite_merge(pd__ctx_t *ctx, const pd__rule_t *r, PgQuery__MergeStmt *m)
{
    for (size_t i = 0; i < m->n_merge_when_clauses && !pd__stopped(ctx); i++) {
        pd__node_t *n = m->merge_when_clauses[i];
        if (n->node_case != PG_QUERY__NODE__NODE_MERGE_WHEN_CLAUSE)
            continue;
        PgQuery__MergeWhenClause *w = n->merge_when_clause;
        if (w->command_type == PG_QUERY__CMD_TYPE__CMD_UPDATE) {
            rewrite_set_list(ctx, r, &w->target_list, &w->n_target_list, pd__refname(m->relation));
        } else if (w->command_type == PG_QUERY__CMD_TYPE__CMD_INSERT) {
            insert_form_t form = {&w->target_list, &w->n_target_list, NULL, &w->values,
                                  &w->n_values};
            rewrite_insert_form(ctx, r, &form);
        }
    }
}

/* COPY FROM cannot carry a derived column: the data never passes through SQL. A column
   list naming none of the rule's columns (none of which has a default) is harmless. */
static void check_copy(pd__ctx_t *ctx, const pd__rule_t *r, const PgQuery__CopyStmt *c)
{
    if (!c->is_from)
        return;
    bool touches = c->n_attlist == 0;
    for (size_t i = 0; i < c->n_attlist && !touches; i++) {
        const char *col = pd__str(c->attlist[i]);
        touches = col != NULL && is_rule_column(r, col);
    }
    /* A translator leaves the old column to new's default when the COPY omits it. */
    for (unsigned i = 0; i < r->npairs && !touches && !r->xlate; i++)
        touches =
            pd__rule_has_default(r, r->pairs[i].old) || pd__rule_has_default(r, r->pairs[i].new);
    if (!touches)
        return;
    char hint[256];
    if (r->xlate)
        snprintf(hint, sizeof hint, "Use INSERT, or list only columns that new keeps as they are.");
    else
        snprintf(hint, sizeof hint,
                 "Use INSERT, or set writes=old for the duration of the load and run pgdualctl "
                 "backfill %s afterwards.",
                 r->cfg->name);
    refuse_write(ctx, r, hint, "COPY into \"%s\" %s", pd__rule_table(r),
                 r->xlate ? "naming a column new renames or transforms cannot be translated"
                          : "is not supported");
}

/* A DO block's statements are plain text to the parser: if one mentions a rule table it
   may write it unseen. */
static void check_do(pd__ctx_t *ctx, const PgQuery__DoStmt *d)
{
    for (size_t i = 0; i < d->n_args; i++) {
        const pd__node_t *a = d->args[i];
        if (a->node_case != PG_QUERY__NODE__NODE_DEF_ELEM || a->def_elem->arg == NULL)
            continue;
        const char *body = pd__str(a->def_elem->arg);
        for (unsigned k = 0; body != NULL && k < pd__col_rules(ctx); k++) {
            const pd__rule_t *r = pd__col_rule(ctx, k);
            for (unsigned t = 0; pd__rule_writes_dual(ctx, r) && t < r->ntables; t++) {
                if (strcasestr(body, r->tables[t].rel) == NULL)
                    continue;
                char hint[256];
                snprintf(hint, sizeof hint,
                         "Run the statements directly, or set writes=old while the block runs "
                         "and run pgdualctl backfill %s afterwards.",
                         r->cfg->name);
                refuse_write(ctx, r, hint,
                             "a DO block mentioning \"%s\" is not supported: pgdual cannot see "
                             "the statements inside it",
                             pd__rule_table(r));
                return;
            }
        }
    }
}

typedef void (*apply_fn)(pd__ctx_t *ctx, const pd__rule_t *r, void *stmt);

static void for_dual_rules(pd__ctx_t *ctx, const PgQuery__RangeVar *rel, apply_fn fn, void *stmt)
{
    for (unsigned i = 0; rel != NULL && i < pd__col_rules(ctx) && !pd__stopped(ctx); i++) {
        const pd__rule_t *r = pd__col_rule(ctx, i);
        if (pd__rule_writes_dual(ctx, r) && pd__rule_matches(r, rel))
            fn(ctx, r, stmt);
    }
}

static void apply_insert(pd__ctx_t *ctx, const pd__rule_t *r, void *s)
{
    rewrite_insert(ctx, r, s);
}

static void apply_update(pd__ctx_t *ctx, const pd__rule_t *r, void *s)
{
    rewrite_update(ctx, r, s);
}

static void apply_merge(pd__ctx_t *ctx, const pd__rule_t *r, void *s)
{
    rewrite_merge(ctx, r, s);
}

static void apply_copy(pd__ctx_t *ctx, const pd__rule_t *r, void *s)
{
    check_copy(ctx, r, s);
}

/* Writes are found anywhere in the tree: in data-modifying CTEs, EXPLAIN ANALYZE, PREPARE. */
static bool write_visit(pd__node_t *n, void *arg)
{
    pd__ctx_t *ctx = arg;
    if (pd__stopped(ctx))
        return false;
    switch (n->node_case) {
    case PG_QUERY__NODE__NODE_INSERT_STMT:
        for_dual_rules(ctx, n->insert_stmt->relation, apply_insert, n->insert_stmt);
        break;
    case PG_QUERY__NODE__NODE_UPDATE_STMT:
        for_dual_rules(ctx, n->update_stmt->relation, apply_update, n->update_stmt);
        break;
    case PG_QUERY__NODE__NODE_MERGE_STMT:
        for_dual_rules(ctx, n->merge_stmt->relation, apply_merge, n->merge_stmt);
        break;
    case PG_QUERY__NODE__NODE_COPY_STMT:
        for_dual_rules(ctx, n->copy_stmt->relation, apply_copy, n->copy_stmt);
        break;
    case PG_QUERY__NODE__NODE_DO_STMT:
        check_do(ctx, n->do_stmt);
        break;
    default:
        break;
    }
    return !pd__stopped(ctx);
}

void pd__rewrite_writes(pd__ctx_t *ctx, pd__node_t *stmt)
{
    if (stmt != NULL && !pd__walk(&stmt->base, write_visit, ctx))
        refuse_too_deep(ctx);
}
