/*
 * report_html.c — the readiness report as an HTML page (report_html.h).
 *
 * Every string taken from the report goes through esc(); only this file's own literals
 * are written raw. The chart is stacked bars, one colour per (rule, kind) series, with a
 * <title> per bar so that a browser shows the numbers on hover without any script.
 */
#include "admin/report_html.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHART_W 800
#define CHART_H 260
#define PLOT_X  56 /* left margin: the y axis labels */
#define PLOT_Y  12
#define PLOT_W  (CHART_W - PLOT_X - 12)
#define PLOT_H  (CHART_H - PLOT_Y - 40)

static const char *const palette[] = {"#d62728", "#1f77b4", "#ff7f0e", "#2ca02c",
                                      "#9467bd", "#8c564b", "#e377c2", "#17becf"};
#define NCOLOURS (sizeof palette / sizeof palette[0])

static const char *entity(char c)
{
    switch (c) {
    case '&':
        return "&amp;";
    case '<':
        return "&lt;";
    case '>':
        return "&gt;";
    case '"':
        return "&quot;";
    case '\'':
        return "&#39;";
    default:
        return NULL;
    }
}

static void esc(FILE *f, const char *s)
{
    for (; s != NULL && *s != '\0'; s++) {
        const char *e = entity(*s);
        if (e != NULL)
            fputs(e, f);
        else
            fputc(*s, f);
    }
}

char *pd_html_escape(const char *s)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (f == NULL)
        return NULL;
    esc(f, s);
    if (fclose(f) != 0) {
        free(text);
        return NULL;
    }
    return text;
}

static const char *str(json_t *obj, const char *key)
{
    const char *s = json_string_value(json_object_get(obj, key));
    return s ? s : "";
}

/* A scalar as cell text: strings as they are, null empty, booleans yes/no. */
static void cell(FILE *f, json_t *v)
{
    if (json_is_string(v)) {
        esc(f, json_string_value(v));
    } else if (json_is_boolean(v)) {
        fputs(json_is_true(v) ? "yes" : "no", f);
    } else if (v != NULL && !json_is_null(v)) {
        char *t = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(15));
        esc(f, t);
        free(t);
    }
}

/* A table of the rows' members `keys` under the headings `heads` (NULL-terminated). */
static void table(FILE *f, json_t *rows, const char *const *keys, const char *const *heads)
{
    if (json_array_size(rows) == 0) {
        fputs("<p class=\"none\">None.</p>\n", f);
        return;
    }
    fputs("<table>\n<tr>", f);
    for (size_t c = 0; heads[c] != NULL; c++)
        fprintf(f, "<th>%s</th>", heads[c]);
    fputs("</tr>\n", f);
    size_t i;
    json_t *row;
    json_array_foreach(rows, i, row)
    {
        fputs("<tr>", f);
        for (size_t c = 0; keys[c] != NULL; c++) {
            fputs(json_is_number(json_object_get(row, keys[c])) ? "<td class=\"n\">" : "<td>", f);
            cell(f, json_object_get(row, keys[c]));
            fputs("</td>", f);
        }
        fputs("</tr>\n", f);
    }
    fputs("</table>\n", f);
}

static void head(FILE *f, json_t *report)
{
    fputs("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          "<title>pgdual cutover readiness: ",
          f);
    esc(f, str(report, "database"));
    fputs("</title>\n<style>\n"
          "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;"
          "max-width:60em;padding:0 1em;color:#222}\n"
          "h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}\n"
          "table{border-collapse:collapse;margin:.5em 0}\n"
          "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}\n"
          "th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}\n"
          "code,td.sql{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;"
          "word-break:break-all}\n"
          ".verdict{font-size:1.3em;font-weight:bold;padding:.4em .8em;display:inline-block}\n"
          ".ready{background:#e3f6e3;color:#145214}.notready{background:#fde8e8;color:#8a1c1c}\n"
          ".pass{color:#145214;font-weight:bold}.fail{color:#8a1c1c;font-weight:bold}\n"
          ".none{color:#777}.legend span{display:inline-block;width:.9em;height:.9em;"
          "margin:0 .3em 0 1em;vertical-align:middle}\n"
          "svg{max-width:100%;height:auto;border:1px solid #eee}\n"
          "</style>\n</head>\n<body>\n",
          f);
}

static void checks(FILE *f, json_t *ready)
{
    bool ok = json_is_true(json_object_get(ready, "ok"));
    fprintf(f, "<p class=\"verdict %s\">%s</p>\n", ok ? "ready" : "notready",
            ok ? "Ready for cutover" : "Not ready for cutover");
    fputs("<table>\n<tr><th>Check</th><th>Result</th><th>Found</th></tr>\n", f);
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(ready, "checks"), i, c)
    {
        bool pass = json_is_true(json_object_get(c, "pass"));
        fputs("<tr><td>", f);
        esc(f, str(c, "title"));
        fputs(" (<code>", f);
        esc(f, str(c, "name"));
        fprintf(f, "</code>)</td><td class=\"%s\">%s</td><td>", pass ? "pass" : "fail",
                pass ? "pass" : "FAIL");
        esc(f, str(c, "value"));
        fputs("</td></tr>\n", f);
    }
    fputs("</table>\n", f);
}

/* The time of bucket b, from the report's start and bucket width. */
static void bucket_time(json_t *div, json_int_t b, char *buf, size_t size)
{
    struct tm tm = {0};
    const char *start = str(div, "start");
    const char *end = strptime(start, "%Y-%m-%dT%H:%M:%SZ", &tm);
    if (end == NULL || *end != '\0') {
        snprintf(buf, size, "bucket %lld", (long long)b + 1);
        return;
    }
    time_t t = timegm(&tm) + (time_t)(b * json_integer_value(json_object_get(div, "bucket_s")));
    gmtime_r(&t, &tm);
    strftime(buf, size, "%Y-%m-%d %H:%M:%S UTC", &tm);
}

/* The tallest stack of the chart. */
static json_int_t chart_max(json_t *series, json_int_t n)
{
    json_int_t max = 0;
    for (json_int_t b = 0; b < n; b++) {
        json_int_t sum = 0;
        size_t i;
        json_t *s;
        json_array_foreach(series, i, s) sum +=
            json_integer_value(json_array_get(json_object_get(s, "counts"), (size_t)b));
        max = sum > max ? sum : max;
    }
    return max;
}

static void chart_axes(FILE *f, json_t *div, json_int_t n, json_int_t max)
{
    fprintf(f,
            "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#888\"/>\n"
            "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#888\"/>\n",
            PLOT_X, PLOT_Y, PLOT_X, PLOT_Y + PLOT_H, PLOT_X, PLOT_Y + PLOT_H, PLOT_X + PLOT_W,
            PLOT_Y + PLOT_H);
    fprintf(f,
            "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%lld</text>\n"
            "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">0</text>\n",
            PLOT_X - 6, PLOT_Y + 10, (long long)max, PLOT_X - 6, PLOT_Y + PLOT_H);
    char from[48], to[48];
    bucket_time(div, 0, from, sizeof from);
    bucket_time(div, n, to, sizeof to);
    fprintf(f, "<text x=\"%d\" y=\"%d\">", PLOT_X, CHART_H - 16);
    esc(f, from);
    fprintf(f, "</text>\n<text x=\"%d\" y=\"%d\" text-anchor=\"end\">", PLOT_X + PLOT_W,
            CHART_H - 16);
    esc(f, to);
    fprintf(f, "</text>\n<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">buckets of %lld s</text>\n",
            PLOT_X + PLOT_W / 2, CHART_H - 2,
            (long long)json_integer_value(json_object_get(div, "bucket_s")));
}

/* One bucket's stack, bottom up in series order. */
static void chart_stack(FILE *f, json_t *div, json_int_t b, json_int_t n, json_int_t max)
{
    double w = (double)PLOT_W / (double)n, y = PLOT_Y + PLOT_H;
    char when[48];
    bucket_time(div, b, when, sizeof when);
    size_t i;
    json_t *s;
    json_array_foreach(json_object_get(div, "series"), i, s)
    {
        json_int_t count =
            json_integer_value(json_array_get(json_object_get(s, "counts"), (size_t)b));
        if (count <= 0)
            continue;
        double h = (double)count * PLOT_H / (double)max;
        y -= h;
        fprintf(f,
                "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" "
                "fill=\"%s\"><title>",
                PLOT_X + w * (double)b + (w > 4 ? 1 : 0), y, w > 4 ? w - 2 : w, h,
                palette[i % NCOLOURS]);
        esc(f, str(s, "rule"));
        fputs(" / ", f);
        esc(f, str(s, "kind"));
        fprintf(f, ": %lld from ", (long long)count);
        esc(f, when);
        fputs("</title></rect>\n", f);
    }
}

static void chart(FILE *f, json_t *div)
{
    json_t *series = json_object_get(div, "series");
    json_int_t n = json_integer_value(json_object_get(div, "buckets"));
    json_int_t max = chart_max(series, n);
    fprintf(f,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 %d %d\" width=\"%d\" "
            "height=\"%d\" role=\"img\" aria-label=\"divergence events over time\" "
            "font-family=\"sans-serif\" font-size=\"11\" fill=\"#444\">\n",
            CHART_W, CHART_H, CHART_W, CHART_H);
    if (n <= 0 || max <= 0) {
        fprintf(f,
                "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">No divergence in the log"
                "</text>\n</svg>\n",
                CHART_W / 2, CHART_H / 2);
        return;
    }
    chart_axes(f, div, n, max);
    for (json_int_t b = 0; b < n; b++)
        chart_stack(f, div, b, n, max);
    fputs("</svg>\n<p class=\"legend\">", f);
    size_t i;
    json_t *s;
    json_array_foreach(series, i, s)
    {
        fprintf(f, "<span style=\"background:%s\"></span>", palette[i % NCOLOURS]);
        esc(f, str(s, "rule"));
        fputs(" / ", f);
        esc(f, str(s, "kind"));
        fprintf(f, " (%lld)", (long long)json_integer_value(json_object_get(s, "total")));
    }
    fputs("</p>\n", f);
}

static void divergence(FILE *f, json_t *div)
{
    fputs("<h2>Divergence over time</h2>\n", f);
    if (!json_is_true(json_object_get(div, "logged")))
        fputs("<p>No <code>divergence.log</code> is configured: events are counted (see "
              "Statements) but not kept, so none are shown over time.</p>\n",
              f);
    else if (json_is_true(json_object_get(div, "window_cut")))
        fputs("<p>The log is longer than pgdual reads for a report: only its newest events "
              "are shown.</p>\n",
              f);
    chart(f, div);
    static const char *const recent_keys[] = {"time", "rule", "kind", "statement", NULL};
    static const char *const recent_heads[] = {"Time", "Rule", "Kind", "Statement (normalized)",
                                               NULL};
    fputs("<h3>Newest events</h3>\n", f);
    table(f, json_object_get(div, "recent"), recent_keys, recent_heads);
}

/* Rules with flags and last verify, flattened for table(). */
static json_t *rule_rows(json_t *rules, bool counters)
{
    json_t *rows = json_array();
    size_t i;
    json_t *r;
    json_array_foreach(rules, i, r)
    {
        json_t *row = json_pack("{s:O}", "name", json_object_get(r, "name"));
        if (counters) {
            json_object_update(row, json_object_get(r, "counters"));
        } else {
            json_t *v = json_object_get(r, "last_verify");
            json_object_update_new(
                row, json_pack("{s:O, s:O, s:O, s:O?, s:O?, s:O?, s:O?, s:O?}", "kind",
                               json_object_get(r, "kind"), "writes", json_object_get(r, "writes"),
                               "reads", json_object_get(r, "reads"), "error",
                               json_object_get(r, "error"), "verified", json_object_get(v, "time"),
                               "verify_ok", json_object_get(v, "ok"), "divergent",
                               json_object_get(v, "divergent"), "since",
                               json_object_get(r, "divergence_since_verify")));
        }
        json_array_append_new(rows, row);
    }
    return rows;
}

json_t *pd_report_history_rows(json_t *history, size_t newest)
{
    json_t *rows = json_array();
    size_t n = json_array_size(history);
    for (size_t i = newest > 0 && n > newest ? n - newest : 0; i < n; i++) {
        json_t *h = json_array_get(history, i);
        json_t *detail = json_deep_copy(h);
        const char *drop[] = {"time", "by", "event", "rule"};
        for (size_t k = 0; k < sizeof drop / sizeof drop[0]; k++)
            json_object_del(detail, drop[k]);
        char *what = NULL;
        if (json_is_string(json_object_get(h, "event")))
            what = strdup(str(h, "event"));
        else if (asprintf(&what, "flags of %s", str(h, "rule")) < 0)
            what = NULL;
        char *text = json_dumps(detail, JSON_COMPACT | JSON_REAL_PRECISION(15));
        json_array_append_new(rows, json_pack("{s:s, s:s, s:s, s:s}", "time", str(h, "time"),
                                              "what", what ? what : "", "by", str(h, "by"),
                                              "detail", text ? text : ""));
        free(text);
        free(what);
        json_decref(detail);
    }
    return rows;
}

int pd_report_html(FILE *out, json_t *report)
{
    head(out, report);
    fputs("<h1>Cutover readiness of database <q>", out);
    esc(out, str(report, "database"));
    fputs("</q></h1>\n<p>Generated by pgdual at ", out);
    esc(out, str(report, "generated_at"));
    fputs(".</p>\n", out);
    checks(out, json_object_get(report, "ready"));
    divergence(out, json_object_get(report, "divergence"));

    json_t *rules = json_object_get(report, "rules");
    static const char *const flag_keys[] = {"name",     "kind",      "writes",    "reads", "error",
                                            "verified", "verify_ok", "divergent", "since", NULL};
    static const char *const flag_heads[] = {"Rule",
                                             "Kind",
                                             "Writes",
                                             "Reads",
                                             "Catalog error",
                                             "Last verify",
                                             "Verify ok",
                                             "Divergent rows at verify",
                                             "Divergence events since",
                                             NULL};
    fputs("<h2>Rules, flags and last verify</h2>\n", out);
    json_t *rows = rule_rows(rules, false);
    table(out, rows, flag_keys, flag_heads);
    json_decref(rows);

    static const char *const count_keys[] = {"name",
                                             "passed",
                                             "rewritten",
                                             "refused",
                                             "mirrored",
                                             "shadow_compared",
                                             "shadow_mismatched",
                                             "aa_compared",
                                             "aa_mismatched",
                                             "mirror_diverged",
                                             "mirror_unapplied",
                                             "mirror_proxy_errors",
                                             NULL};
    static const char *const count_heads[] = {"Rule",
                                              "Passed",
                                              "Rewritten",
                                              "Refused",
                                              "Mirrored",
                                              "Shadow reads compared",
                                              "Shadow reads differing",
                                              "A/A reads compared",
                                              "A/A reads differing (noise floor)",
                                              "Mirror outcomes differing",
                                              "Mirror writes unapplied",
                                              "Mirror errors caused by pgdual",
                                              NULL};
    fputs("<h2>Statements since pgdual started</h2>\n", out);
    rows = rule_rows(rules, true);
    table(out, rows, count_keys, count_heads);
    json_decref(rows);

    static const char *const mirror_keys[] = {"open", "connecting", "detached", "queued", NULL};
    static const char *const mirror_heads[] = {"Open", "Connecting", "Detached",
                                               "Statements queued", NULL};
    fputs("<h2>Mirror lag (whole server)</h2>\n", out);
    rows = json_pack("[O]", json_object_get(report, "mirrors"));
    table(out, rows, mirror_keys, mirror_heads);
    json_decref(rows);

    static const char *const hist_keys[] = {"time", "what", "by", "detail", NULL};
    static const char *const hist_heads[] = {"Time", "What", "By", "Details", NULL};
    json_t *watch = json_object_get(report, "watch");
    static const char *const watch_keys[] = {
        "state",  "until",      "max_divergence", "max_error_rate", "divergence",   "requests",
        "errors", "error_rate", "rate_before",    "reason",         "last_failure", NULL};
    static const char *const watch_heads[] = {"State",
                                              "Until",
                                              "Max divergence",
                                              "Max error rate (above before)",
                                              "Divergence since the switch",
                                              "Requests since",
                                              "Errors since",
                                              "Error rate",
                                              "Error rate before",
                                              "Triggered by",
                                              "Last failed attempt",
                                              NULL};
    fputs("<h2>Rollback watch (switchover --watch)</h2>\n", out);
    table(out, json_object_get(watch, "active"), watch_keys, watch_heads);
    fputs("<h3>Watch events</h3>\n", out);
    rows = pd_report_history_rows(json_object_get(watch, "events"), 0);
    table(out, rows, hist_keys, hist_heads);
    json_decref(rows);

    fputs("<h2>History of flags and operator events</h2>\n", out);
    rows = pd_report_history_rows(json_object_get(report, "history"), 0);
    table(out, rows, hist_keys, hist_heads);
    json_decref(rows);

    fputs("</body>\n</html>\n", out);
    return ferror(out) ? -1 : 0;
}
