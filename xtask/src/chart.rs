//! `cargo xtask chart`: renders the Helm chart (`deploy/charts/waymark`)
//! into the plain manifests (`deploy/daemonset.yaml`), or checks that the
//! committed manifests are what the chart renders.
//!
//! `helm` is not installable on the machines waymark is built on (no
//! Debian, PyPI, npm or crates.io package), so the chart is rendered here
//! with a Go text/template engine (the `gtmpl` crate) and the few Helm
//! functions the chart uses, with Helm's semantics: `default`, `quote`,
//! `toJson`, `sha256sum`, `trunc`. The chart keeps to Go's built-ins
//! besides those (`template`, not Helm's `include`), so `helm template`
//! renders the same objects.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use gtmpl::{Context as TmplContext, FuncError, Template, Value};

/// What `cargo xtask chart` does.
#[derive(clap::Args)]
pub struct ChartArgs {
    /// Compare instead of writing: fail if the committed manifests differ
    /// from what the chart renders.
    #[arg(long)]
    check: bool,
}

/// The release the plain manifests are rendered as.
const RELEASE: &str = "waymark";
const NAMESPACE: &str = "waymark-system";

pub fn run(args: ChartArgs) -> Result<()> {
    let root = repo_root();
    let rendered = plain_manifests(&root)?;
    let out = root.join("deploy/daemonset.yaml");
    if args.check {
        let committed =
            std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
        ensure!(
            committed == rendered,
            "{} is not what deploy/charts/waymark renders: run `cargo xtask chart`",
            out.display()
        );
        eprintln!("{} is the chart rendered", out.display());
    } else {
        std::fs::write(&out, rendered).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repository")
        .to_owned()
}

/// The plain manifests: the chart with its default values, as release
/// `waymark` in `waymark-system`, creating the namespace.
pub fn plain_manifests(root: &Path) -> Result<String> {
    let chart = root.join("deploy/charts/waymark");
    let body = render(
        &chart,
        RELEASE,
        NAMESPACE,
        &[("createNamespace", serde_json::Value::Bool(true))],
    )?;
    Ok(format!(
        "# waymark node agent, one per node: the Helm chart deploy/charts/waymark\n\
         # rendered with its default values (release {RELEASE}, namespace\n\
         # {NAMESPACE}) by `cargo xtask chart`. Edit the chart, not this file.\n\
         # The AuthorizationPolicy CRD is deploy/authorizationpolicy-crd.yaml.\n\
         #\n\
         # The agent discovers the cluster from the API server (list and watch\n\
         # only, see the ClusterRole) and enrolls the pods of its node whose\n\
         # namespace carries the label `waymark.dev/mesh: enabled` (or that carry\n\
         # the annotation themselves; `disabled` on a pod opts it out). hostNetwork\n\
         # pods and the agent itself are never redirected. mTLS needs the issuer\n\
         # Secret (make it with `waymark identity init --dir DIR` and\n\
         # `kubectl -n {NAMESPACE} create secret generic waymark-issuer --from-file=DIR`).\n\
         {body}"
    ))
}

/// Renders every template of `chart` (files under `templates/` ending in
/// `.yaml`; `_*.tpl` files only define named templates) with its
/// `values.yaml` and `overrides` (dotted keys), as `helm template` does:
/// each file's output after `---` and a `# Source:` line, empty ones left
/// out.
pub fn render(
    chart: &Path,
    release: &str,
    namespace: &str,
    overrides: &[(&str, serde_json::Value)],
) -> Result<String> {
    let meta: serde_json::Value = read_yaml(&chart.join("Chart.yaml"))?;
    let chart_name = meta["name"]
        .as_str()
        .context("Chart.yaml has no name")?
        .to_string();
    let mut values: serde_json::Value = read_yaml(&chart.join("values.yaml"))?;
    for (key, value) in overrides {
        set_dotted(&mut values, key, value.clone())?;
    }
    let context = TmplContext::from(Value::Object(HashMap::from([
        ("Values".to_string(), to_value(&values)),
        (
            "Chart".to_string(),
            Value::Object(HashMap::from([
                ("Name".to_string(), Value::from(chart_name.clone())),
                ("Version".to_string(), to_value(&meta["version"])),
                ("AppVersion".to_string(), to_value(&meta["appVersion"])),
            ])),
        ),
        (
            "Release".to_string(),
            Value::Object(HashMap::from([
                ("Name".to_string(), Value::from(release)),
                ("Namespace".to_string(), Value::from(namespace)),
                ("Service".to_string(), Value::from("Helm")),
            ])),
        ),
    ])));

    let dir = chart.join("templates");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    let mut helpers = Vec::new();
    let mut manifests = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .context("a template file name is not UTF-8")?
            .to_string();
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        if name.starts_with('_') {
            helpers.push((name, text));
        } else if name.ends_with(".yaml") {
            manifests.push((name, text));
        }
    }
    let mut docs: Vec<(usize, String)> = Vec::new();
    for (name, text) in manifests {
        let mut t = Template::default();
        t.add_funcs(HELM_FUNCS);
        for (h, body) in &helpers {
            t.add_template(h.clone(), body.clone())
                .map_err(|e| anyhow::anyhow!("{h}: {e}"))?;
        }
        t.parse(text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let rendered = t
            .render(&context)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        ensure!(
            !rendered.contains("<no value>"),
            "{name} refers to a value the chart does not have:\n{rendered}"
        );
        for doc in rendered.split("\n---\n") {
            let doc = doc.trim_start_matches("---\n").trim_matches('\n');
            if doc
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
            {
                continue;
            }
            let kind = doc
                .lines()
                .find_map(|l| l.strip_prefix("kind:"))
                .map(str::trim)
                .with_context(|| format!("{name}: an object without a kind:\n{doc}"))?;
            docs.push((
                install_order(kind),
                format!("---\n# Source: {chart_name}/templates/{name}\n{doc}\n"),
            ));
        }
    }
    // Helm writes (and installs) objects in an order where each exists
    // before what needs it: the namespace first, the DaemonSet last.
    docs.sort_by_key(|(order, _)| *order);
    Ok(docs.into_iter().map(|(_, d)| d).collect())
}

/// Where objects of `kind` go in Helm's install order (unknown kinds last).
fn install_order(kind: &str) -> usize {
    const ORDER: &[&str] = &[
        "Namespace",
        "NetworkPolicy",
        "ResourceQuota",
        "LimitRange",
        "PodDisruptionBudget",
        "ServiceAccount",
        "Secret",
        "ConfigMap",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "DaemonSet",
    ];
    ORDER.iter().position(|k| *k == kind).unwrap_or(ORDER.len())
}

fn read_yaml(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_norway::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Sets `a.b.c` in `values`, as `helm --set a.b.c=…` does.
fn set_dotted(values: &mut serde_json::Value, key: &str, value: serde_json::Value) -> Result<()> {
    let mut at = values;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let Some(map) = at.as_object_mut() else {
            bail!("cannot set {key}: {} is not a map", parts[..i].join("."));
        };
        if i + 1 == parts.len() {
            map.insert(part.to_string(), value);
            return Ok(());
        }
        at = map
            .entry(part.to_string())
            .or_insert_with(|| serde_json::json!({}));
    }
    Ok(())
}

fn to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or_default()),
        },
        serde_json::Value::String(s) => Value::from(s.clone()),
        serde_json::Value::Array(a) => Value::Array(a.iter().map(to_value).collect()),
        serde_json::Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect())
        }
    }
}

fn from_value(v: &Value) -> serde_json::Value {
    match v {
        Value::NoValue | Value::Nil | Value::Function(_) => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Number(n) => n
            .as_i64()
            .map(serde_json::Value::from)
            .or_else(|| n.as_u64().map(serde_json::Value::from))
            .or_else(|| n.as_f64().map(serde_json::Value::from))
            .unwrap_or(serde_json::Value::Null),
        Value::Array(a) => serde_json::Value::Array(a.iter().map(from_value).collect()),
        Value::Object(m) | Value::Map(m) => {
            // Sorted keys, as Go's encoding/json writes maps.
            let sorted: std::collections::BTreeMap<_, _> =
                m.iter().map(|(k, v)| (k.clone(), from_value(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
    }
}

/// Helm's functions the chart uses.
const HELM_FUNCS: &[(&str, gtmpl::Func)] = &[
    ("default", default),
    ("quote", quote),
    ("toJson", to_json),
    ("sha256sum", sha256sum),
    ("trunc", trunc),
];

/// Go's notion of an empty value (sprig's `empty`).
fn is_empty(v: &Value) -> bool {
    match v {
        Value::NoValue | Value::Nil => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) | Value::Map(m) => m.is_empty(),
        Value::Number(n) => {
            n.as_i64() == Some(0) || n.as_u64() == Some(0) || n.as_f64() == Some(0.0)
        }
        Value::Function(_) => false,
    }
}

/// `x | default d`: `x` unless it is empty.
fn default(args: &[Value]) -> Result<Value, FuncError> {
    match args {
        [d] => Ok(d.clone()),
        [d, given] => Ok(if is_empty(given) { d } else { given }.clone()),
        _ => Err(FuncError::AtLeastXArgs("default".into(), 1)),
    }
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::NoValue | Value::Nil => String::new(),
        other => other.to_string(),
    }
}

/// Each argument as a double-quoted string (Go's `%q`), space-separated.
fn quote(args: &[Value]) -> Result<Value, FuncError> {
    let quoted: Vec<String> = args
        .iter()
        .filter(|v| !matches!(v, Value::NoValue | Value::Nil))
        .map(|v| serde_json::Value::String(as_text(v)).to_string())
        .collect();
    Ok(Value::from(quoted.join(" ")))
}

fn to_json(args: &[Value]) -> Result<Value, FuncError> {
    let [v] = args else {
        return Err(FuncError::ExactlyXArgs("toJson".into(), 1));
    };
    Ok(Value::from(from_value(v).to_string()))
}

fn sha256sum(args: &[Value]) -> Result<Value, FuncError> {
    let [v] = args else {
        return Err(FuncError::ExactlyXArgs("sha256sum".into(), 1));
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, as_text(v).as_bytes());
    Ok(Value::from(
        digest
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    ))
}

/// `s | trunc n`: the first `n` characters (the last `-n` when negative).
fn trunc(args: &[Value]) -> Result<Value, FuncError> {
    let [n, s] = args else {
        return Err(FuncError::ExactlyXArgs("trunc".into(), 2));
    };
    let Value::Number(n) = n else {
        return Err(FuncError::UnableToConvertFromValue);
    };
    let n = n.as_i64().ok_or(FuncError::UnableToConvertFromValue)?;
    let chars: Vec<char> = as_text(s).chars().collect();
    let len = chars.len() as i64;
    let (from, to) = if n >= 0 {
        (0, n.min(len))
    } else {
        ((len + n).max(0), len)
    };
    Ok(Value::from(
        chars[from as usize..to as usize].iter().collect::<String>(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_text(text: &str, values: serde_json::Value) -> Result<String> {
        let mut t = Template::default();
        t.add_funcs(HELM_FUNCS);
        t.parse(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let ctx = TmplContext::from(Value::Object(HashMap::from([(
            "Values".to_string(),
            to_value(&values),
        )])));
        t.render(&ctx).map_err(|e| anyhow::anyhow!("{e}"))
    }

    #[test]
    fn helm_functions_behave_as_helms() {
        let v = serde_json::json!({"tag": "", "name": "a\"b", "n": 0, "on": false, "m": {"b": 1, "a": [true]}});
        assert_eq!(
            render_text(r#"{{ .Values.tag | default "1.0" }}"#, v.clone()).unwrap(),
            "1.0"
        );
        assert_eq!(
            render_text(
                r#"{{ .Values.n | default 7 }}/{{ .Values.on | default "x" }}"#,
                v.clone()
            )
            .unwrap(),
            "7/x"
        );
        assert_eq!(
            render_text("{{ .Values.name | quote }}", v.clone()).unwrap(),
            r#""a\"b""#
        );
        assert_eq!(
            render_text("{{ .Values.m | toJson }}", v.clone()).unwrap(),
            r#"{"a":[true],"b":1}"#
        );
        // sha256 of "abc".
        assert_eq!(
            render_text(r#"{{ "abc" | sha256sum | trunc 8 }}"#, v.clone()).unwrap(),
            "ba7816bf"
        );
        assert_eq!(
            render_text(r#"{{ "abcdef" | trunc -2 }}"#, v).unwrap(),
            "ef"
        );
    }

    #[test]
    fn the_plain_manifests_are_the_chart_rendered() {
        let root = repo_root();
        let rendered = plain_manifests(&root).unwrap();
        let committed = std::fs::read_to_string(root.join("deploy/daemonset.yaml")).unwrap();
        assert!(
            committed == rendered,
            "deploy/daemonset.yaml is not what the chart renders: run `cargo xtask chart`"
        );
    }

    #[test]
    fn values_change_what_is_rendered() {
        let chart = repo_root().join("deploy/charts/waymark");
        let base = render(&chart, "wm", "mesh", &[]).unwrap();
        assert!(!base.contains("kind: Namespace"), "{base}");
        assert!(base.contains("name: wm-config") && base.contains("namespace: mesh"));
        assert!(base.contains("NET_RAW"));
        let no_capture = render(
            &chart,
            "wm",
            "mesh",
            &[("capture.enabled", serde_json::Value::Bool(false))],
        )
        .unwrap();
        assert!(!no_capture.contains("NET_RAW"), "{no_capture}");
        assert!(no_capture.contains("enabled = false"));
        let err = render(
            &chart,
            "wm",
            "mesh",
            &[("image.x.y", serde_json::Value::Bool(false))],
        );
        assert!(err.is_ok(), "nested new keys are created: {err:?}");
        let err = render(
            &chart,
            "wm",
            "mesh",
            &[("drainGrace.x", serde_json::Value::Bool(false))],
        )
        .unwrap_err();
        assert!(err.to_string().contains("not a map"), "{err}");
    }
}
