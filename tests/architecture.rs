//! ARCHITECTURE.md's dependency rules, checked against every workspace member's `Cargo.toml`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One row of the rules table: the tessera crates a crate may use, and its other dependencies
/// when that list is closed (`None` = any).
#[derive(Debug)]
struct Rule {
    tessera: Option<BTreeSet<String>>,
    others: Option<BTreeSet<String>>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// `none` = empty, `any` = no limit, else a comma-separated list.
fn names(cell: &str) -> Option<BTreeSet<String>> {
    match cell.trim() {
        "any" => None,
        "none" => Some(BTreeSet::new()),
        list => Some(list.split(',').map(|n| n.trim().to_string()).collect()),
    }
}

/// The table under `## Dependency rules`, keyed by crate folder.
fn rules(architecture: &str) -> BTreeMap<String, Rule> {
    let section = architecture
        .split("## Dependency rules")
        .nth(1)
        .expect("ARCHITECTURE.md has a '## Dependency rules' section");
    let mut rules = BTreeMap::new();
    for line in section.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').collect();
        let name = cells[0].trim();
        if !name.starts_with('`') {
            continue; // the header and its rule
        }
        assert_eq!(cells.len(), 3, "rules row {line:?}: expected 3 cells");
        let rule = Rule {
            tessera: names(cells[1]),
            others: names(cells[2]),
        };
        rules.insert(name.trim_matches('`').to_string(), rule);
    }
    assert!(!rules.is_empty(), "the dependency rules table has no rows");
    rules
}

fn manifest(path: &Path) -> toml::Table {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The dependency names of one section (`dependencies`, `dev-dependencies`...).
fn section(manifest: &toml::Table, key: &str) -> Vec<String> {
    manifest
        .get(key)
        .and_then(toml::Value::as_table)
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

/// Every rule broken by one member, as sentences naming the crate, the dependency and the rule.
fn broken(member: &str, manifest: &toml::Table, rule: &Rule) -> Vec<String> {
    let mut problems = Vec::new();
    let sections = ["dependencies", "build-dependencies", "dev-dependencies"];
    for key in sections {
        for dep in section(manifest, key) {
            let Some(used) = dep.strip_prefix("tessera-") else {
                if key == "dev-dependencies" {
                    continue;
                }
                if let Some(others) = &rule.others
                    && !others.contains(&dep)
                {
                    problems.push(format!(
                        "{member}: [{key}] names {dep}, outside its closed list ({})",
                        others.iter().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
                continue;
            };
            if let Some(allowed) = &rule.tessera
                && !allowed.contains(used)
            {
                problems.push(format!(
                    "{member}: [{key}] uses tessera-{used}, but {member} may use only {}",
                    if allowed.is_empty() {
                        "none".to_string()
                    } else {
                        allowed.iter().cloned().collect::<Vec<_>>().join(", ")
                    }
                ));
            }
        }
    }
    problems
}

#[test]
fn every_crate_keeps_the_dependency_rules_of_architecture_md() {
    let root = root();
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md at the workspace root");
    let rules = rules(&architecture);
    let workspace = manifest(&root.join("Cargo.toml"));
    let members: Vec<String> = workspace["workspace"]["members"]
        .as_array()
        .expect("workspace.members")
        .iter()
        .map(|m| m.as_str().expect("a member path").to_string())
        .collect();
    let mut problems = Vec::new();
    for member in &members {
        let Some(rule) = rules.get(member) else {
            problems.push(format!(
                "{member}: no row in ARCHITECTURE.md's dependency rules"
            ));
            continue;
        };
        problems.extend(broken(
            member,
            &manifest(&root.join(member).join("Cargo.toml")),
            rule,
        ));
    }
    for ruled in rules.keys() {
        if !members.contains(ruled) {
            problems.push(format!("{ruled}: a rule for a crate that is not a member"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_broken_rule_is_named() {
    let rules = rules(
        "## Dependency rules\n\n| crate | may use | other dependencies |\n|---|---|---|\n\
         | `models` | kernels | serde |\n",
    );
    let manifest: toml::Table = "[dependencies]\ntessera-kernels = {}\ntessera-data = {}\n\
                                 serde = {}\ntokio = {}\n[dev-dependencies]\ntempfile = {}\n"
        .parse()
        .unwrap();
    let problems = broken("models", &manifest, &rules["models"]);
    assert_eq!(
        problems,
        [
            "models: [dependencies] uses tessera-data, but models may use only kernels",
            "models: [dependencies] names tokio, outside its closed list (serde)",
        ]
    );
}
