//! Warnings about policies that are legal but probably wrong. `flowgate check` prints
//! them; they never stop a policy from loading (a reload must not fail because a team
//! has not deployed its workloads yet).
//!
//! The checks:
//! - a policy whose subject selects no workload, and a workload peer that matches none
//!   (typos in labels are the commonest policy bug, and they fail silently);
//! - an Allow egress rule to `0.0.0.0/0` or `::/0` (the whole internet);
//! - a rule of an AdminNetworkPolicy / BaselineAdminNetworkPolicy / ClusterNetworkPolicy
//!   that can never decide anything because an earlier rule of the same policy and
//!   direction matches every peer and port it does. Conservative: only the cases that
//!   are certain (the same peer, a containing CIDR, every workload; the same port, a
//!   containing range, or no port restriction at all);
//! - the same kind/namespace/name twice (the later one would replace the earlier in a
//!   cluster; flowgate keeps both, which is not what the author sees in a cluster);
//! - two Admin-tier policies with the same priority (Kubernetes leaves their order
//!   undefined; flowgate orders them by name);
//! - an expired policy, a TTL over 24 h (an emergency rule that lives for days is a
//!   permanent rule in disguise), a BaselineAdminNetworkPolicy not named `default`
//!   (Kubernetes only accepts that one);
//! - a NetworkPolicy spelling that the API server reads differently from how it looks
//!   ([`load::spellings`]): `policyTypes: []` (read as `[Ingress]`, or `[Ingress, Egress]`
//!   with egress rules), `egress: []` without `Egress` in `policyTypes` (no egress
//!   isolation), `from: []` / `to: []` (every peer, not none).
//!
//! The IR keeps what a policy means, not how it was written, so the spelling checks read
//! the policy files again ([`Spellings`]: each once; [`lint`] reads the disk, [`lint_with`]
//! takes the text from its caller, [`lint_spelled`] takes spellings read beforehand, which
//! lets `flowgate check` read them while the set loads). A file that can no longer be read
//! only loses those warnings. Every spelling check is about an empty list, which YAML can
//! only write as `[]` (flow style, perhaps with blanks or a comment inside) or behind a
//! tag: a file with neither is not parsed again at all ([`may_spell`]).
//!
//! Cost: one pass over the policies; selectors are resolved through the compiler's label
//! index ([`Selectors`]), each distinct selector once. `benches/check_test.rs` measures it
//! on the realistic 10k × 10k set.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::compile::Selectors;
use super::ir::{
    Action, Expiry, LabelSelector, NamespaceMatch, Peer, Peers, Policy, PolicyKind, PolicySet,
    PortMatch, Rule, Tier, WorkloadSelector,
};
use super::load::{self, Spelling};

/// TTLs longer than this get a warning.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// One warning, located like a [`LoadError`](super::LoadError).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub file: PathBuf,
    /// `Kind ns/name`.
    pub object: String,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.object)?;
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All warnings for `set`, in policy order. `now` decides what has expired. The policy
/// files are read again for the spelling checks (see the module doc).
pub fn lint(set: &PolicySet, now: SystemTime) -> Vec<Warning> {
    lint_with(set, now, |file| std::fs::read_to_string(file).ok())
}

/// [`lint`], with the text of each policy file given by `read` (`None`: no spelling
/// warnings for that file).
pub fn lint_with(
    set: &PolicySet,
    now: SystemTime,
    read: impl Fn(&Path) -> Option<String>,
) -> Vec<Warning> {
    lint_spelled(set, now, Spellings::of_set(set, read))
}

/// [`lint`], with the spelling warnings read beforehand ([`Spellings::from_load`] from
/// the load itself, [`Spellings::of_dir`] on the directory the set was loaded from, or
/// [`Spellings::read`] on its files). Spellings of
/// files or objects the set does not hold are ignored.
pub fn lint_spelled<'s>(set: &'s PolicySet, now: SystemTime, spellings: Spellings) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut spellings = spellings;
    // The compiler's selector index: posting lists, each distinct selector resolved once
    // (a scan of every workload per selector was most of `check` at 10,000 policies).
    let selectors = std::cell::RefCell::new(Selectors::new(&set.inventory, set.policies.len()));
    let selects_any = |sel: &'s WorkloadSelector| {
        let mut s = selectors.borrow_mut();
        let k = s.select(sel);
        !s.ids(k).is_empty()
    };

    let mut seen: BTreeMap<(&str, Option<&str>, &str), &Policy> = BTreeMap::new();
    let mut by_priority: BTreeMap<u32, Vec<&Policy>> = BTreeMap::new();

    for p in &set.policies {
        let mut warn = |field: Option<String>, message: String| {
            out.push(Warning { file: p.source.clone(), object: object(p), field, message });
        };

        if !selects_any(&p.subject) {
            let field = match p.kind {
                PolicyKind::NetworkPolicy => "spec.podSelector",
                _ => "spec.subject",
            };
            warn(Some(field.into()), "selects no workload in the inventory".into());
        }

        if p.kind == PolicyKind::NetworkPolicy {
            for s in spellings.take(&p.source, &object(p)) {
                warn(Some(s.field), s.message);
            }
        }

        for (dir, peer_field, rules) in
            [("ingress", "from", &p.ingress), ("egress", "to", &p.egress)]
        {
            let rules = rules.as_deref().unwrap_or_default();
            for (i, rule) in rules.iter().enumerate() {
                let rule_field = format!("spec.{dir}[{i}]");
                if let Peers::List(peers) = &rule.peers {
                    for (j, peer) in peers.iter().enumerate() {
                        // NetworkPolicy peers are one-to-one with the YAML list; admin
                        // `networks`/`domainNames` entries expand, so name the rule only.
                        let field = match p.kind {
                            PolicyKind::NetworkPolicy => format!("{rule_field}.{peer_field}[{j}]"),
                            _ => rule_field.clone(),
                        };
                        match peer {
                            Peer::Workloads(sel) if !selects_any(sel) => warn(
                                Some(field),
                                format!(
                                    "peer {} matches no workload in the inventory",
                                    describe(sel)
                                ),
                            ),
                            Peer::Cidr { net, except }
                                if dir == "egress"
                                    && net.prefix_len() == 0
                                    && rule.action == Action::Allow =>
                            {
                                let but =
                                    if except.is_empty() { "" } else { " (minus its excepts)" };
                                warn(
                                    Some(field),
                                    format!("allows egress to {net}{but}: the whole internet"),
                                );
                            }
                            _ => {}
                        }
                    }
                }
                if p.kind != PolicyKind::NetworkPolicy
                    && let Some((k, earlier)) =
                        rules[..i].iter().enumerate().find(|(_, e)| covers(e, rule))
                {
                    let name =
                        earlier.name.as_deref().map(|n| format!(" ({n:?})")).unwrap_or_default();
                    let why = if earlier.peers == rule.peers && earlier.ports == rule.ports {
                        "has the same peers and ports"
                    } else {
                        "matches every peer and port this rule does"
                    };
                    warn(
                        Some(rule_field),
                        format!(
                            "shadowed by spec.{dir}[{k}]{name}, which {why}: this rule never decides anything"
                        ),
                    );
                }
            }
        }

        let key = (p.kind.as_str(), p.namespace.as_deref(), p.name.as_str());
        if let Some(first) = seen.get(&key) {
            warn(
                Some("metadata.name".into()),
                format!(
                    "duplicate: {} {} is also defined in {}",
                    p.kind.as_str(),
                    p.display_name(),
                    first.source.display()
                ),
            );
        } else {
            seen.insert(key, p);
        }

        if let Tier::Admin { priority } = p.tier {
            by_priority.entry(priority).or_default().push(p);
        }

        match p.expiry {
            Some(Expiry::At(t)) if t <= now => {
                warn(
                    Some("metadata.annotations".into()),
                    "has expired (flowgate.dev/expires-at is in the past) and is not enforced"
                        .into(),
                );
            }
            Some(Expiry::Ttl(ttl)) => {
                if ttl > MAX_TTL {
                    warn(
                        Some("metadata.annotations".into()),
                        format!(
                            "flowgate.dev/ttl is {} (over 24h): an emergency policy should be short-lived",
                            humantime::format_duration(ttl)
                        ),
                    );
                }
                if p.created_at.and_then(|c| c.checked_add(ttl)).is_some_and(|end| end <= now) {
                    warn(Some("metadata.annotations".into()), "has expired (creationTimestamp + flowgate.dev/ttl is in the past) and is not enforced".into());
                }
            }
            _ => {}
        }

        if p.kind == PolicyKind::BaselineAdminNetworkPolicy && p.name != "default" {
            warn(
                Some("metadata.name".into()),
                "a BaselineAdminNetworkPolicy should be named \"default\" (Kubernetes accepts only that one)".into(),
            );
        }
    }

    for (priority, group) in by_priority {
        if group.len() < 2 {
            continue;
        }
        let mut names: Vec<_> = group.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        for p in &group[1..] {
            out.push(Warning {
                file: p.source.clone(),
                object: object(p),
                field: Some("spec.priority".into()),
                message: format!(
                    "priority {priority} is shared by {}; Kubernetes leaves their order undefined, \
                     flowgate evaluates them by name",
                    names.join(", ")
                ),
            });
        }
    }
    out
}

/// The spelling warnings ([`load::spellings`]) of a set of policy files, by file, in
/// document order: what [`lint_spelled`] reports for each NetworkPolicy.
#[derive(Debug, Default)]
pub struct Spellings {
    by_file: HashMap<PathBuf, Vec<Spelling>>,
}

impl Spellings {
    /// Reads each of `files` once with `read` (`None`: no spellings for that file). Only
    /// a text that [`may_spell`] is parsed.
    pub fn read<'f>(
        files: impl IntoIterator<Item = &'f Path>,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Spellings {
        let mut by_file = HashMap::new();
        for file in files {
            if by_file.contains_key(file) {
                continue;
            }
            let found = read(file).filter(|t| may_spell(t)).map(|t| load::spellings(&t));
            by_file.insert(file.to_owned(), found.unwrap_or_default());
        }
        Spellings { by_file }
    }

    /// The spellings [`load::load_spelled`] found while loading (no file read again).
    pub fn from_load(found: load::FileSpellings) -> Spellings {
        Spellings { by_file: found.into_iter().collect() }
    }

    /// Every policy file of `dir` (as [`load::load`] walks it), read from the disk. Walk
    /// and read problems only cost their spellings: the load reports them.
    pub fn of_dir(dir: &Path) -> Spellings {
        let files = load::policy_files(dir, &mut Vec::new());
        Spellings::read(files.iter().map(PathBuf::as_path), |f| std::fs::read_to_string(f).ok())
    }

    /// The files of `set`'s NetworkPolicies, read with `read`.
    fn of_set(set: &PolicySet, read: impl Fn(&Path) -> Option<String>) -> Spellings {
        let files: BTreeSet<&Path> = set
            .policies
            .iter()
            .filter(|p| p.kind == PolicyKind::NetworkPolicy)
            .map(|p| p.source.as_path())
            .collect();
        Spellings::read(files, read)
    }

    /// Removes and returns the spellings of `object` in `file`: a second policy with the
    /// same file and label (a duplicate) gets none, as the first already reported them.
    fn take(&mut self, file: &Path, object: &str) -> Vec<Spelling> {
        let Some(list) = self.by_file.get_mut(file) else { return Vec::new() };
        if list.is_empty() {
            return Vec::new();
        }
        let (mine, rest) = std::mem::take(list).into_iter().partition(|s| s.object == object);
        *list = rest;
        mine
    }
}

/// Could `text` hold a spelling [`load::spellings`] reports? Each of them is an empty list
/// (`policyTypes`, `egress`, `from`, `to`), and YAML writes an empty list only as a flow
/// sequence with nothing but blanks, line breaks or a comment between `[` and `]`, or as a
/// tagged node (`!!seq`). An alias needs its anchored `[]` in the same text. So `false`
/// means no spelling for sure; `true` only means the text has to be parsed (it is rare:
/// on the realistic set, the files with an empty list).
pub fn may_spell(text: &str) -> bool {
    let b = text.as_bytes();
    if b.contains(&b'!') {
        return true;
    }
    let mut at = 0;
    while let Some(i) = b[at..].iter().position(|&c| c == b'[') {
        let after = at + i + 1;
        let next = b[after..].iter().find(|c| !matches!(c, b' ' | b'\t' | b'\r' | b'\n'));
        if matches!(next, Some(b']' | b'#')) {
            return true;
        }
        at = after;
    }
    false
}

fn object(p: &Policy) -> String {
    format!("{} {}", p.kind.as_str(), p.display_name())
}

fn describe(sel: &WorkloadSelector) -> String {
    let ns = match &sel.namespaces {
        NamespaceMatch::Named(n) => format!("namespace {n}"),
        NamespaceMatch::Selector(s) => format!("namespaces {}", describe_selector(s)),
    };
    format!("(pods {} in {ns})", describe_selector(&sel.pods))
}

fn describe_selector(s: &LabelSelector) -> String {
    if s.is_empty() {
        return "{}".into();
    }
    let mut parts: Vec<String> = s.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for r in &s.match_expressions {
        parts.push(format!("{} {:?} {:?}", r.key, r.op, r.values));
    }
    format!("{{{}}}", parts.join(", "))
}

/// Does `earlier` match every flow `later` matches? Only certain cases count.
fn covers(earlier: &Rule, later: &Rule) -> bool {
    let peers = match (&earlier.peers, &later.peers) {
        (Peers::Any, _) => true,
        (Peers::List(_), Peers::Any) => false,
        (Peers::List(a), Peers::List(b)) => {
            b.iter().all(|pb| a.iter().any(|pa| peer_covers(pa, pb)))
        }
    };
    let ports = match (&earlier.ports, &later.ports) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => b.iter().all(|pb| a.iter().any(|pa| port_covers(pa, pb))),
    };
    peers && ports
}

fn peer_covers(a: &Peer, b: &Peer) -> bool {
    if a == b {
        return true;
    }
    match (a, b) {
        (Peer::Cidr { net: na, except: ea }, Peer::Cidr { net: nb, .. }) => {
            ea.is_empty() && na.contains(nb)
        }
        (Peer::Workloads(wa), Peer::Workloads(_)) => {
            wa.pods.is_empty()
                && matches!(&wa.namespaces, NamespaceMatch::Selector(s) if s.is_empty())
        }
        _ => false,
    }
}

fn port_covers(a: &PortMatch, b: &PortMatch) -> bool {
    match (a, b) {
        (
            PortMatch::Range { protocol: pa, first: fa, last: la },
            PortMatch::Range { protocol: pb, first: fb, last: lb },
        ) => pa == pb && fa <= fb && lb <= la,
        (PortMatch::Named { protocol: None, name: na }, PortMatch::Named { name: nb, .. }) => {
            na == nb
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::load::{parse_inventory, parse_policies};

    const INV: &str = "namespaces:
- {name: shop, labels: {team: shop}}
workloads:
- {name: web, namespace: shop, labels: {app: web}, ips: [198.18.0.1]}
- {name: db, namespace: shop, labels: {app: db}, ips: [198.18.0.2]}
";

    fn set(yaml: &str) -> PolicySet {
        let inventory = parse_inventory(INV, Path::new("inv.yaml")).expect("inventory");
        let policies = match parse_policies(yaml, Path::new("p.yaml")) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        PolicySet::new(inventory, policies)
    }

    fn warnings(yaml: &str) -> Vec<String> {
        lint(&set(yaml), SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000))
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn has(ws: &[String], needle: &str) -> bool {
        ws.iter().any(|w| w.contains(needle))
    }

    fn np(name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n"
        )
    }

    fn anp(name: &str, priority: u32, egress: &str) -> String {
        format!(
            "---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {{name: {name}}}\nspec: {{priority: {priority}, subject: {{namespaces: {{}}}}, egress: {egress}}}\n"
        )
    }

    #[test]
    fn clean_policy_has_no_warnings() {
        let ws = warnings(&np(
            "ok",
            "{podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]}",
        ));
        assert!(ws.is_empty(), "{ws:?}");
    }

    #[test]
    fn subject_and_peer_that_match_nothing() {
        let ws = warnings(&np(
            "typo",
            "{podSelector: {matchLabels: {app: dbb}}, ingress: [{from: [{podSelector: {}}, {podSelector: {matchLabels: {app: wbe}}}]}]}",
        ));
        assert!(
            has(&ws, "p.yaml: NetworkPolicy shop/typo: spec.podSelector: selects no workload"),
            "{ws:?}"
        );
        assert!(
            has(
                &ws,
                "spec.ingress[0].from[1]: peer (pods {app=wbe} in namespace shop) matches no workload"
            ),
            "{ws:?}"
        );
        assert_eq!(ws.len(), 2, "the {{}} peer matches: {ws:?}");
    }

    #[test]
    fn egress_to_everything() {
        let ws = warnings(&np(
            "wide",
            "{podSelector: {}, egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}, {ipBlock: {cidr: '::/0'}}]}]}",
        ));
        assert!(
            has(&ws, "spec.egress[0].to[0]: allows egress to 0.0.0.0/0 (minus its excepts)"),
            "{ws:?}"
        );
        assert!(has(&ws, "spec.egress[0].to[1]: allows egress to ::/0"), "{ws:?}");
        // A Deny to everything is a guardrail, not a hole.
        let ws = warnings(&anp("deny-all", 5, "[{action: Deny, to: [{networks: [0.0.0.0/0]}]}]"));
        assert!(!has(&ws, "whole internet"), "{ws:?}");
    }

    #[test]
    fn shadowed_admin_rules() {
        let ws = warnings(&anp(
            "s",
            1,
            "[{name: a, action: Deny, to: [{networks: [10.0.0.0/8]}]},
              {name: b, action: Allow, to: [{networks: [10.1.0.0/16]}], ports: [{portNumber: {port: 443}}]},
              {name: c, action: Allow, to: [{networks: [10.0.0.0/8]}]},
              {name: d, action: Allow, to: [{networks: [192.168.0.0/16]}], ports: [{portRange: {start: 1, end: 1000}}]},
              {name: e, action: Deny, to: [{networks: [192.168.1.0/24]}], ports: [{portNumber: {port: 80}}]},
              {name: f, action: Deny, to: [{networks: [192.168.1.0/24]}]}]",
        ));
        assert!(
            has(
                &ws,
                "spec.egress[1]: shadowed by spec.egress[0] (\"a\"), which matches every peer"
            ),
            "{ws:?}"
        );
        assert!(
            has(
                &ws,
                "spec.egress[2]: shadowed by spec.egress[0] (\"a\"), which has the same peers and ports"
            ),
            "{ws:?}"
        );
        assert!(has(&ws, "spec.egress[4]: shadowed by spec.egress[3]"), "{ws:?}");
        // `d` only covers ports 1-1000: `f` (all ports) is not shadowed.
        assert!(!has(&ws, "spec.egress[5]"), "{ws:?}");
    }

    #[test]
    fn duplicates_and_priority_ties() {
        let ws = warnings(&format!(
            "{}{}{}{}",
            np("x", "{}"),
            np("x", "{}"),
            anp("b", 3, "[]"),
            anp("a", 3, "[]")
        ));
        assert!(has(&ws, "NetworkPolicy shop/x: metadata.name: duplicate"), "{ws:?}");
        assert!(
            has(&ws, "AdminNetworkPolicy a: spec.priority: priority 3 is shared by a, b"),
            "{ws:?}"
        );
        assert!(has(&ws, "by name"), "{ws:?}");
    }

    /// Issue 27: spellings that the API server reads differently from how they look are
    /// warnings saying how they are read.
    #[test]
    fn spellings_that_differ_from_their_meaning() {
        let yaml = np(
            "open",
            "{podSelector: {matchLabels: {app: db}}, policyTypes: [], ingress: [{from: []}]}",
        );
        let text = |file: &Path| (file == Path::new("p.yaml")).then(|| yaml.clone());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let ws: Vec<String> =
            lint_with(&set(&yaml), now, text).iter().map(ToString::to_string).collect();
        assert!(
            has(
                &ws,
                "p.yaml: NetworkPolicy shop/open: spec.policyTypes: empty policyTypes is read as [Ingress],"
            ),
            "{ws:?}"
        );
        assert!(has(&ws, "spec.ingress[0].from: empty from is read as no from"), "{ws:?}");
        assert_eq!(ws.len(), 2, "{ws:?}");
        // Without the text of the file there is nothing to read the spelling from.
        let none = lint_with(&set(&yaml), now, |_| None);
        assert!(none.is_empty(), "{none:?}");
    }

    /// `lint` reads each NetworkPolicy's file from the disk.
    #[test]
    fn lint_reads_the_policy_files_for_spellings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("deny-all.yaml");
        let yaml = np("deny-all", "{podSelector: {}, policyTypes: [], egress: [{}]}");
        std::fs::write(&file, &yaml).expect("write");
        let inventory = parse_inventory(INV, Path::new("inv.yaml")).expect("inventory");
        let policies = parse_policies(&yaml, &file).expect("policies");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let ws = lint(&PolicySet::new(inventory, policies), now);
        assert_eq!(ws.len(), 1, "{ws:?}");
        assert_eq!(ws[0].file, file);
        assert_eq!(ws[0].field.as_deref(), Some("spec.policyTypes"));
        assert!(ws[0].message.contains("read as [Ingress, Egress]"), "{ws:?}");
    }

    /// `may_spell` is a filter in front of the parse: every text with a spelling passes
    /// it, written any way YAML allows an empty list; texts without one mostly do not.
    #[test]
    fn may_spell_lets_every_spelling_through() {
        let spelled = [
            "policyTypes: []",
            "policyTypes: [ ]",
            "policyTypes: [\n  ]",
            "policyTypes: [\t\r\n]",
            "policyTypes: [ # nothing\n]",
            "policyTypes: !!seq []",
            "policyTypes: !!seq",
            "x: &none []\npolicyTypes: *none",
            "ingress: [{from: []}]",
            "egress:\n  - to: []\n",
        ];
        for spec in spelled {
            let yaml = format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: n, namespace: shop}}\nspec:\n  podSelector: {{}}\n{}\n",
                spec.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
            );
            assert!(may_spell(&yaml), "{spec:?}");
        }
        for plain in [
            "policyTypes: [Ingress, Egress]",
            "podSelector: {}",
            "except: [10.0.0.0/8]",
            "egress:\n  - to:\n      - podSelector: {}",
        ] {
            assert!(!may_spell(plain), "{plain:?}");
        }
    }

    /// Over every policy file in the repository: a text `may_spell` turns away has no
    /// spelling at all.
    #[test]
    fn may_spell_never_hides_a_spelling_in_the_repository() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        for dir in ["tests/fixtures", "config"] {
            files.extend(load::policy_files(&root.join(dir), &mut Vec::new()));
        }
        assert!(files.len() > 20, "{files:?}");
        let mut parsed = 0;
        for f in &files {
            let Ok(text) = std::fs::read_to_string(f) else { continue };
            if may_spell(&text) {
                parsed += 1;
            } else {
                assert!(load::spellings(&text).is_empty(), "{}", f.display());
            }
        }
        assert!(parsed < files.len(), "the filter lets everything through");
    }

    /// The spellings read ahead from the directory (what `flowgate check` does beside the
    /// load) give `lint`'s warnings, duplicates included.
    #[test]
    fn spellings_read_ahead_give_the_same_warnings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = np(
            "open",
            "{podSelector: {matchLabels: {app: db}}, policyTypes: [], ingress: [{from: []}]}",
        );
        std::fs::write(dir.path().join("a.yaml"), format!("{open}{open}")).expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        let wide = np("wide", "{podSelector: {}, egress: []}");
        std::fs::write(dir.path().join("sub/b.yaml"), &wide).expect("write");
        let inventory = parse_inventory(INV, Path::new("inv.yaml")).expect("inventory");
        let set = PolicySet::new(inventory, load::load_policies(dir.path()).expect("policies"));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let read = lint(&set, now);
        let ahead = lint_spelled(&set, now, Spellings::of_dir(dir.path()));
        assert_eq!(read, ahead);
        let spelled = read.iter().filter(|w| w.message.contains("is read as")).count();
        assert_eq!(spelled, 5, "both copies of `open` reported by the first: {read:#?}");
    }

    #[test]
    fn expiry_ttl_and_banp_name() {
        let ann = |a: &str| {
            format!(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: e, namespace: shop, creationTimestamp: '2020-01-01T00:00:00Z', annotations: {{{a}}}}}\nspec: {{}}\n"
            )
        };
        assert!(has(
            &warnings(&ann("flowgate.dev/expires-at: '2020-01-01T00:00:00Z'")),
            "has expired"
        ));
        assert!(!has(
            &warnings(&ann("flowgate.dev/expires-at: '2099-01-01T00:00:00Z'")),
            "expired"
        ));
        let ws = warnings(&ann("flowgate.dev/ttl: 48h"));
        assert!(has(&ws, "over 24h"), "{ws:?}");
        assert!(has(&ws, "has expired"), "created 2020 + 48h is long past: {ws:?}");
        assert!(!has(&warnings(&ann("flowgate.dev/ttl: 24h")), "over 24h"));
        let banp = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: base}\nspec: {subject: {namespaces: {}}}\n";
        assert!(has(&warnings(banp), "should be named \"default\""));
    }
}
