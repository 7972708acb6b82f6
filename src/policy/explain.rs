//! The cold twin of `decide`: the same answer with its trace, for `flowgate explain`,
//! `flowgate test` and the admin API.
//!
//! It runs the very functions `decide` runs (`CompiledPolicy::evaluate`/`side`) and
//! then turns their `Copy` outcomes into names. Its JSON form (`explain --json`, the admin
//! API) is stable: every field is always present, `null` when it does not apply.
//! So the verdict here and the verdict of `decide` come from one computation; the
//! property test checks it anyway.

use std::net::IpAddr;

use serde::Serialize;

use super::compile::{CRule, SideTable, dir_index};
use super::decide::{DecidedBy, Evaluation, SideOutcome};
use super::ir::Action;
use super::{CompiledPolicy, Decision, FlowQuery, PolicyId, Verdict, WorkloadId};
use crate::flow::Direction;

/// Why a flow gets its verdict, per side and tier.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// `allow` or `deny`.
    pub verdict: &'static str,
    /// The side that denied (`egress`/`ingress`), absent for allow and for unknown flows.
    pub direction: Option<&'static str>,
    /// `Cause::as_str` of a denial.
    pub reason: Option<&'static str>,
    /// The deciding policy, as `Decision::policy`.
    pub policy: Option<String>,
    /// The audit-mode policy that would have denied the flow.
    pub would_deny: Option<String>,
    pub src: EndpointInfo,
    pub dst: EndpointInfo,
    pub port: u16,
    pub protocol: String,
    pub fqdn: Option<String>,
    /// Neither endpoint is a workload: `policy.unknown` decided.
    pub unknown: bool,
    /// The source's egress side, when the source is a workload.
    pub egress: Option<SideTrace>,
    /// The destination's ingress side, when the destination is a workload.
    pub ingress: Option<SideTrace>,
    /// With audit-mode policies enforced, when that changes the verdict to deny.
    pub audit: Option<AuditTrace>,
    /// The decision itself (equal to `decide`'s answer).
    #[serde(skip)]
    pub decision: Decision,
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointInfo {
    pub ip: IpAddr,
    /// `ns/name`, or `None` for an external address.
    pub workload: Option<String>,
}

/// The sides as they are with audit-mode policies enforced.
#[derive(Clone, Debug, Serialize)]
pub struct AuditTrace {
    pub egress: Option<SideTrace>,
    pub ingress: Option<SideTrace>,
}

/// One side's walk through the tiers.
#[derive(Clone, Debug, Serialize)]
pub struct SideTrace {
    pub workload: String,
    pub verdict: &'static str,
    /// `admin`, `networkpolicy`, `baseline` or `default`.
    pub decided_by: &'static str,
    /// The Admin rule that matched (Allow/Deny) or passed (Pass); `None`: no Admin rule
    /// matched.
    pub admin: Option<RuleRef>,
    /// The NetworkPolicies isolating the workload in this direction (empty: not isolated).
    pub isolated_by: Vec<String>,
    /// The NetworkPolicy rule that admitted the flow.
    pub admitted_by: Option<RuleRef>,
    /// The Baseline rule that matched.
    pub baseline: Option<RuleRef>,
    /// `allow`/`deny` when `policy.default` decided.
    pub default: Option<&'static str>,
    /// Not evaluated by `decide` because the other side already denied; shown for
    /// completeness.
    pub informational: bool,
}

/// A rule, by policy and position.
#[derive(Clone, Debug, Serialize)]
pub struct RuleRef {
    pub policy: String,
    pub kind: &'static str,
    /// The rule's name (ANP) or `ingress[i]`/`egress[i]`.
    pub rule: String,
    pub index: usize,
    /// `Allow`, `Deny` or `Pass`.
    pub action: &'static str,
}

fn verdict_str(allow: bool) -> &'static str {
    if allow { "allow" } else { "deny" }
}

impl CompiledPolicy {
    /// The decision for `q` and the trace behind it. Allocates; not for the data path.
    pub fn explain(&self, q: &FlowQuery<'_>) -> Explanation {
        let (real, audit) = self.evaluate(q);
        let mut decision = real.decision;
        let mut audit_trace = None;
        if let Some(a) = audit
            && !a.decision.verdict.is_allow()
        {
            decision.would_deny = a.decision.policy;
            audit_trace = Some(AuditTrace {
                egress: self.trace_side(&self.audit_sides, q, &a, Direction::Egress),
                ingress: self.trace_side(&self.audit_sides, q, &a, Direction::Ingress),
            });
        }
        let (direction, reason) = match decision.verdict {
            Verdict::Allow => (None, None),
            Verdict::Deny(r) => (r.direction.map(Direction::as_str), Some(r.cause.as_str())),
        };
        Explanation {
            verdict: verdict_str(decision.verdict.is_allow()),
            direction,
            reason,
            policy: decision.policy.map(|p| self.policy_label(p)),
            would_deny: decision.would_deny.map(|p| self.policy_label(p)),
            src: EndpointInfo { ip: q.src, workload: self.workload_label(decision.src_workload) },
            dst: EndpointInfo { ip: q.dst, workload: self.workload_label(decision.dst_workload) },
            port: q.dst_port,
            protocol: q.proto.to_string(),
            fqdn: q.fqdn.map(str::to_string),
            unknown: decision.src_workload.is_none() && decision.dst_workload.is_none(),
            egress: self.trace_side(&self.sides, q, &real, Direction::Egress),
            ingress: self.trace_side(&self.sides, q, &real, Direction::Ingress),
            audit: audit_trace,
            decision,
        }
    }

    fn policy_label(&self, id: PolicyId) -> String {
        match (self.policy_kind(id), self.policy_name(id)) {
            (Some(kind), Some(name)) => format!("{} {name}", kind.as_str()),
            _ => format!("policy #{}", id.0),
        }
    }

    fn workload_label(&self, id: Option<WorkloadId>) -> Option<String> {
        id.and_then(|w| self.workload_name(w)).map(|n| n.to_string())
    }

    fn trace_side(
        &self,
        sides: &[SideTable],
        q: &FlowQuery<'_>,
        eval: &Evaluation,
        dir: Direction,
    ) -> Option<SideTrace> {
        let (w, evaluated) = match dir {
            Direction::Egress => (eval.decision.src_workload?, eval.egress),
            Direction::Ingress => (eval.decision.dst_workload?, eval.ingress),
        };
        let informational = evaluated.is_none();
        let outcome: SideOutcome = match evaluated {
            Some(o) => o,
            None => {
                let src = self.end(q.src);
                let dst = self.end(q.dst);
                let peer = if dir == Direction::Egress { dst } else { src };
                self.side_at(sides, w.0, dir, q, peer, dst, self.port_segment(q))
            }
        };
        let table = &sides[w.0 as usize * 2 + dir_index(dir)];
        let rule_ref = |r: Option<u32>| r.map(|r| self.rule_ref(&self.rules[r as usize], dir));
        Some(SideTrace {
            workload: self.workload_label(Some(w)).unwrap_or_default(),
            verdict: verdict_str(outcome.allow),
            decided_by: match outcome.by {
                DecidedBy::Admin => "admin",
                DecidedBy::NetworkPolicy => "networkpolicy",
                DecidedBy::Baseline => "baseline",
                DecidedBy::Default => "default",
            },
            admin: if outcome.by == DecidedBy::Admin {
                rule_ref(outcome.rule)
            } else {
                rule_ref(outcome.passed)
            },
            isolated_by: table
                .np_policies
                .of(&self.lists)
                .iter()
                .map(|&p| self.policy_label(PolicyId(p)))
                .collect(),
            admitted_by: if outcome.by == DecidedBy::NetworkPolicy {
                rule_ref(outcome.rule)
            } else {
                None
            },
            baseline: if outcome.by == DecidedBy::Baseline { rule_ref(outcome.rule) } else { None },
            default: (outcome.by == DecidedBy::Default).then_some(verdict_str(outcome.allow)),
            informational,
        })
    }

    fn rule_ref(&self, rule: &CRule, dir: Direction) -> RuleRef {
        let index = rule.index as usize;
        let meta = &self.policies[rule.policy as usize];
        let names = match dir {
            Direction::Ingress => &meta.ingress_names,
            Direction::Egress => &meta.egress_names,
        };
        let name = names.get(index).cloned().flatten();
        RuleRef {
            policy: meta.name.clone(),
            kind: meta.kind.as_str(),
            rule: name.unwrap_or_else(|| format!("{}[{index}]", dir.as_str())),
            index,
            action: match rule.action {
                Action::Allow => "Allow",
                Action::Deny => "Deny",
                Action::Pass => "Pass",
            },
        }
    }
}
