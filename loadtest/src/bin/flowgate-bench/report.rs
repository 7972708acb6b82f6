//! The results table and the charts' block in BENCHMARKS.md, each between its markers;
//! everything outside the markers is left as written.

use std::path::{Path, PathBuf};

use crate::charts::Chart;
use crate::{Opts, Row};

const TABLE: (&str, &str) = ("<!-- loadtest/run:table -->", "<!-- /loadtest/run:table -->");
const CHARTS: (&str, &str) = ("<!-- loadtest/run:charts -->", "<!-- /loadtest/run:charts -->");

fn cell(s: &str) -> String {
    if s.is_empty() { "—".into() } else { s.replace('|', "\\|").replace('\n', " ") }
}

pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| capability | target | result | peer, same run | ratio | met? | command | machine | date, commit |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = r.ratio.map_or("—".into(), |x| format!("{}×", crate::criterion::sig3(x)));
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {met} | {} | {} | {}, {} |\n",
            cell(&r.capability),
            cell(&r.target),
            cell(&r.result),
            cell(&r.peer),
            ratio,
            cell(&r.command),
            cell(&r.machine),
            cell(&r.date),
            cell(&r.commit),
        ));
    }
    t
}

/// `path` relative to `base` when it lies below it (the links in the markdown file).
fn relative(path: &Path, base: &Path) -> PathBuf {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (p, b) = (abs(path), abs(base));
    p.strip_prefix(&b).map(Path::to_path_buf).unwrap_or(p)
}

fn charts_block(opts: &Opts, rows: &[Row], charts: &[Chart]) -> String {
    let base = opts.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut s = String::new();
    if let Some(soak) = rows.iter().find(|r| r.scenario == "soak") {
        s.push_str(&format!(
            "**Soak** ({}, {}): {} — {}.\n\n",
            soak.date,
            soak.commit,
            soak.result,
            soak.command.trim()
        ));
    }
    for c in charts {
        let link = relative(&c.path, base);
        s.push_str(&format!("![{}]({})\n", c.title, link.display()));
        if !c.note.is_empty() {
            s.push_str(&format!("\n{}\n", c.note));
        }
        s.push('\n');
    }
    s
}

/// Replaces what lies between `marks` in `doc` (the markers kept), or inserts the block
/// after the title line when the document has no such markers yet.
fn splice(doc: &str, marks: (&str, &str), body: &str) -> String {
    let block = format!("{}\n{}{}", marks.0, body, marks.1);
    if let (Some(a), Some(b)) = (doc.find(marks.0), doc.find(marks.1))
        && a < b
    {
        return format!("{}{}{}", &doc[..a], block, &doc[b + marks.1.len()..]);
    }
    match doc.find('\n') {
        Some(i) if doc.starts_with("# ") => format!("{}\n\n{block}\n{}", &doc[..i], &doc[i..]),
        _ => format!("{block}\n\n{doc}"),
    }
}

pub fn rewrite(opts: &Opts, rows: &[Row], charts: &[Chart]) -> Result<(), String> {
    let doc =
        std::fs::read_to_string(&opts.out).unwrap_or_else(|_| "# flowgate benchmarks\n".into());
    let doc = splice(&doc, TABLE, &table(rows));
    let doc = splice(&doc, CHARTS, &charts_block(opts, rows, charts));
    std::fs::write(&opts.out, doc).map_err(|e| format!("{}: {e}", opts.out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splices_between_markers_and_keeps_the_rest() {
        let doc = format!("# t\n\nintro\n{}\nold\n{}\nrest\n", TABLE.0, TABLE.1);
        let got = splice(&doc, TABLE, "new\n");
        assert_eq!(got, format!("# t\n\nintro\n{}\nnew\n{}\nrest\n", TABLE.0, TABLE.1));
        // Without markers: after the title.
        let got = splice("# t\nbody\n", TABLE, "x\n");
        assert!(got.starts_with(&format!("# t\n\n{}\nx\n{}\n", TABLE.0, TABLE.1)), "{got}");
        assert!(got.ends_with("\nbody\n"), "{got}");
    }

    #[test]
    fn escapes_pipes() {
        let r = Row {
            capability: "a|b".into(),
            ratio: Some(1.234),
            met: Some(false),
            ..Row::default()
        };
        let t = table(&[r]);
        assert!(t.contains("| a\\|b |"), "{t}");
        assert!(t.contains("| 1.23× | **no** |"), "{t}");
    }
}
