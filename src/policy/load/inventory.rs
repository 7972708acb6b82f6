//! `inventory.yaml` → [`Inventory`]: who is who. Namespaces get the
//! `kubernetes.io/metadata.name` label Kubernetes gives them, so `namespaceSelector`s on
//! it work as in a cluster. Checked: names, labels, addresses (a bare address is a /32 or
//! /128; a CIDR must have no host bits), named ports, and the uniqueness rules the engine
//! relies on — a workload name once per namespace, an address or CIDR owned once.
//! Overlapping but different CIDRs are fine: identity is longest-prefix match.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ipnet::IpNet;
use serde_norway::Value;

use super::{LoadError, Report, k8s, strict, validate};
use crate::policy::ir::{Inventory, NAMESPACE_NAME_LABEL, NamedPort, Namespace, Workload};

pub fn load_file(path: &Path, errors: &mut Vec<LoadError>) -> Inventory {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, path, errors),
        Err(e) => {
            errors.push(LoadError {
                file: path.to_owned(),
                object: None,
                field: None,
                message: format!("cannot read inventory: {e}"),
            });
            Inventory::default()
        }
    }
}

pub fn parse(text: &str, file: &Path, errors: &mut Vec<LoadError>) -> Inventory {
    // The fast path when the file allows it (one large file: it was a sixth of a 10k
    // check); the slow one below for its messages otherwise.
    let parsed = match strict::document::<k8s::InventoryFile>(text) {
        Some(Some(parsed)) => parsed,
        Some(None) => return Inventory::default(),
        None => match parse_slow(text, file, errors) {
            Some(parsed) => parsed,
            None => return Inventory::default(),
        },
    };
    check(parsed, file, errors)
}

/// The inventory through a `Value`, reporting serde's problem with its field path.
fn parse_slow(text: &str, file: &Path, errors: &mut Vec<LoadError>) -> Option<k8s::InventoryFile> {
    let value = match serde_norway::from_str::<Value>(text) {
        Ok(v) => v,
        Err(e) => {
            errors.push(LoadError {
                file: file.to_owned(),
                object: None,
                field: None,
                message: format!("malformed YAML: {e}"),
            });
            return None;
        }
    };
    if value.is_null() {
        return None;
    }
    Report::new(file, None, errors).typed(value)
}

/// The checks on a parsed inventory file.
fn check(parsed: k8s::InventoryFile, file: &Path, errors: &mut Vec<LoadError>) -> Inventory {
    let mut inv = Inventory::default();
    let mut ns_seen = BTreeSet::new();
    for (i, ns) in parsed.namespaces.iter().flatten().enumerate() {
        let mut r = Report::new(file, Some(format!("Namespace {}", ns.name)), errors);
        let path = format!("namespaces[{i}]");
        if !validate::is_dns_label(&ns.name) {
            r.error(
                &format!("{path}.name"),
                format!("{:?} is not a valid namespace name (DNS label)", ns.name),
            );
        }
        if !ns_seen.insert(ns.name.clone()) {
            r.error(&format!("{path}.name"), "namespace declared twice");
        }
        let mut labels = validate::labels(&mut r, &format!("{path}.labels"), ns.labels.as_ref());
        if labels.get(NAMESPACE_NAME_LABEL).is_some_and(|v| *v != ns.name) {
            r.error(
                &format!("{path}.labels.{NAMESPACE_NAME_LABEL}"),
                "must equal the namespace name (Kubernetes sets it; leave it out)",
            );
        }
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), ns.name.clone());
        inv.namespaces.push(Namespace { name: ns.name.clone(), labels });
    }

    let mut workload_seen = BTreeSet::new();
    // network → the workload that owns it, to name both in a duplicate error.
    let mut owners: BTreeMap<IpNet, String> = BTreeMap::new();
    for (i, w) in parsed.workloads.iter().flatten().enumerate() {
        let id = format!("{}/{}", w.namespace, w.name);
        let mut r = Report::new(file, Some(format!("Workload {id}")), errors);
        let path = format!("workloads[{i}]");
        if !validate::is_dns_subdomain(&w.name) {
            r.error(
                &format!("{path}.name"),
                format!("{:?} is not a valid name (DNS subdomain)", w.name),
            );
        }
        if !ns_seen.contains(&w.namespace) {
            r.error(
                &format!("{path}.namespace"),
                format!("namespace {:?} is not declared", w.namespace),
            );
        }
        if !workload_seen.insert(id.clone()) {
            r.error(&format!("{path}.name"), format!("workload {id} declared twice"));
        }
        let labels = validate::labels(&mut r, &format!("{path}.labels"), w.labels.as_ref());
        let mut addrs = Vec::new();
        for (j, ip) in w.ips.iter().flatten().enumerate() {
            let field = format!("{path}.ips[{j}]");
            let Some(net) = validate::addr_or_cidr(&mut r, &field, ip) else { continue };
            match owners.get(&net) {
                Some(owner) => r.error(&field, format!("{net} is already owned by {owner}")),
                None => {
                    owners.insert(net, id.clone());
                    addrs.push(net);
                }
            }
        }
        let mut ports = Vec::new();
        let mut port_names = BTreeSet::new();
        for (j, p) in w.ports.iter().flatten().enumerate() {
            let pp = format!("{path}.ports[{j}]");
            let name_ok = validate::port_name(&mut r, &format!("{pp}.name"), &p.name);
            if !port_names.insert(p.name.clone()) {
                r.error(&format!("{pp}.name"), format!("port name {:?} used twice", p.name));
            }
            let port = validate::port_number(&mut r, &format!("{pp}.port"), p.port);
            let protocol =
                validate::protocol(&mut r, &format!("{pp}.protocol"), p.protocol.as_deref());
            if let (true, Some(port), Some(protocol)) = (name_ok, port, protocol) {
                ports.push(NamedPort { name: p.name.clone(), port, protocol });
            }
        }
        inv.workloads.push(Workload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            labels,
            addrs,
            ports,
        });
    }
    inv
}
