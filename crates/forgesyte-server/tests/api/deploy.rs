//! The deployment files checked against the binary: every YAML document
//! under `deploy/kubernetes/` and the `Dockerfile` are parsed, and what
//! they rely on is asked of the real `forgesyte`: their options and the
//! ConfigMap's `forgesyte.toml` through `forgesyte config --print`
//! (accepted, and the effective listen port equals the container port the
//! probes, the Service and the scrape annotation name), the probe paths and
//! the scrape path on a running server (routed, not 404).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::support::{Forgesyte, run_forgesyte};
use forgesyte_tests::write_script;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every YAML document under `deploy/kubernetes/`, with its file name.
fn documents() -> Vec<(String, Value)> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut documents = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        for document in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"));
            if !value.is_null() {
                documents.push((name.clone(), value));
            }
        }
    }
    documents
}

fn of_kind<'a>(documents: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    documents
        .iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d)
        .collect()
}

fn text(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, found {value}"))
}

/// The ConfigMap holding `forgesyte.toml`: its name and that file's text.
fn config_map(documents: &[(String, Value)]) -> (String, String) {
    let maps = of_kind(documents, "ConfigMap");
    let map = maps
        .iter()
        .find(|m| m["data"]["forgesyte.toml"].is_string())
        .expect("a ConfigMap with a forgesyte.toml");
    (
        text(&map["metadata"]["name"]).to_owned(),
        text(&map["data"]["forgesyte.toml"]).to_owned(),
    )
}

/// `forgesyte config --print` for the `serve` arguments `args` (the
/// `serve` word first), with `env`: the effective configuration, parsed.
fn effective(args: &[String], env: &[(String, String)], what: &str) -> toml::Table {
    assert_eq!(
        args.first().map(String::as_str),
        Some("serve"),
        "{what}: the command is not `serve`: {args:?}"
    );
    let mut print = vec!["config", "--print"];
    print.extend(args[1..].iter().map(String::as_str));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_forgesyte(&print, &env);
    assert_eq!(code, 0, "{what}: the binary refuses {args:?}: {err}");
    out.parse()
        .unwrap_or_else(|e| panic!("{what}: config --print is not TOML ({e}):\n{out}"))
}

/// The port of a `host:port` listen address.
fn port_of(bind: &toml::Value) -> u16 {
    let bind = bind.as_str().expect("bind is a string");
    let (_, port) = bind.rsplit_once(':').expect("bind is host:port");
    port.parse().expect("a port number")
}

/// What the manifests and the Dockerfile need of a running server.
#[derive(Debug, Default)]
struct Needs {
    probe_paths: BTreeSet<String>,
    scrape_paths: BTreeSet<String>,
}

/// A Deployment's forgesyte container checked against the binary: its
/// options (with the ConfigMap mounted where the Deployment mounts it)
/// are accepted, and every port it names is the effective listen port.
fn check_deployment(
    deployment: &Value,
    config_map: &(String, String),
    image_env: &[(String, String)],
    needs: &mut Needs,
) {
    let name = text(&deployment["metadata"]["name"]).to_owned();
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    let container = spec["containers"]
        .as_array()
        .and_then(|c| c.first())
        .unwrap_or_else(|| panic!("{name}: no container"));
    let mut args: Vec<String> = container["args"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: no args"))
        .iter()
        .map(|a| text(a).to_owned())
        .collect();

    // The config file the args name: the ConfigMap, where it is mounted.
    let scratch = tempfile::tempdir().unwrap();
    let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    let mounts = container["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mount_of = |volume: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == volume)
            .map(|m| text(&m["mountPath"]).to_owned())
    };
    if let Some(i) = args.iter().position(|a| a == "--config") {
        let path = args.get(i + 1).cloned().expect("--config FILE");
        let volume = volumes
            .iter()
            .find(|v| v["configMap"]["name"] == config_map.0.as_str())
            .unwrap_or_else(|| panic!("{name}: no volume of ConfigMap {}", config_map.0));
        let mount = mount_of(text(&volume["name"]))
            .unwrap_or_else(|| panic!("{name}: the ConfigMap volume is not mounted"));
        assert_eq!(
            Path::new(&path),
            Path::new(&mount).join("forgesyte.toml"),
            "{name}: --config names another file than the mounted forgesyte.toml"
        );
        let local = scratch.path().join("forgesyte.toml");
        std::fs::write(&local, &config_map.1).unwrap();
        args[i + 1] = local.to_str().unwrap().to_owned();
    }
    let mut env = image_env.to_vec();
    for var in container["env"].as_array().cloned().unwrap_or_default() {
        if let Some(value) = var["value"].as_str() {
            env.push((text(&var["name"]).to_owned(), value.to_owned()));
        }
    }
    let config = effective(&args, &env, &name);
    let port = port_of(&config["bind"]);

    // Ports by name; every port named is the listen port.
    let ports: BTreeMap<String, u64> = container["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: no ports"))
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["containerPort"].as_u64().expect("containerPort"),
            )
        })
        .collect();
    assert!(
        ports.values().any(|p| *p == u64::from(port)),
        "{name}: no containerPort {port} (the effective bind): {ports:?}"
    );
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let get = &container[probe]["httpGet"];
        if probe != "startupProbe" {
            assert!(get.is_object(), "{name}: no {probe}.httpGet");
        }
        if !get.is_object() {
            continue;
        }
        let probe_port = match &get["port"] {
            Value::String(named) => *ports
                .get(named)
                .unwrap_or_else(|| panic!("{name}: {probe} names no port {named}")),
            number => number.as_u64().expect("a port"),
        };
        assert_eq!(probe_port, u64::from(port), "{name}: {probe} port");
        needs.probe_paths.insert(text(&get["path"]).to_owned());
    }
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    // The pod's grace covers the preStop pause, the server's one shutdown
    // grace (the drain and a reload in progress together) and the wait for
    // its plugins' processes to end.
    let pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("{name}: no preStop pause before SIGTERM"));
    let grace = config["shutdown-grace"]
        .as_integer()
        .and_then(|g| u64::try_from(g).ok())
        .unwrap_or_else(|| panic!("{name}: no shutdown-grace in {config}"));
    let pod_grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    let runners = forgesyte_loader::RUNNER_STOP_WAIT.as_secs();
    assert!(
        pod_grace > pause + grace + runners,
        "{name}: terminationGracePeriodSeconds {pod_grace} <= preStop {pause} + shutdown-grace \
         {grace} + the runners' stop {runners}"
    );

    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true", "{name}");
    assert_eq!(
        annotations["prometheus.io/port"],
        port.to_string(),
        "{name}: scrape port"
    );
    needs
        .scrape_paths
        .insert(text(&annotations["prometheus.io/path"]).to_owned());

    // Limits, and the plugins directory is a mounted volume.
    let limits = &container["resources"]["limits"];
    assert!(
        limits["cpu"].is_string() && limits["memory"].is_string(),
        "{name}: limits"
    );
    let plugins = config["plugins"].as_str().expect("plugins");
    assert!(
        mounts.iter().any(|m| m["mountPath"] == plugins),
        "{name}: the plugins directory {plugins} is not a mounted volume"
    );
    if name.contains("gpu") {
        assert_eq!(limits["nvidia.com/gpu"], 1, "{name}: one GPU");
        assert!(spec["nodeSelector"].is_object(), "{name}: nodeSelector");
        assert!(
            spec["tolerations"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["key"] == "nvidia.com/gpu")),
            "{name}: GPU toleration"
        );
    }
}

/// The Dockerfile's instructions, continuation lines joined, comments out:
/// (INSTRUCTION, rest).
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (word, rest) = current.split_once(' ').unwrap_or((&current, ""));
                instructions.push((word.to_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    instructions
}

/// The runtime stage's instructions (after its last `FROM`).
fn runtime_stage() -> Vec<(String, String)> {
    let all = dockerfile();
    let last_from = all.iter().rposition(|(i, _)| i == "FROM").expect("FROM");
    all[last_from..].to_vec()
}

/// The files of the repository the stage `COPY`s: image path → path here.
fn copied(stage: &[(String, String)]) -> BTreeMap<&str, PathBuf> {
    stage
        .iter()
        .filter(|(i, rest)| i == "COPY" && !rest.starts_with("--from"))
        .filter_map(|(_, rest)| {
            let (from, to) = rest.split_once(' ')?;
            Some((to.trim(), repo().join(from)))
        })
        .collect()
}

/// `ENV` of the runtime stage: the `FORGESYTE_*` variables. A path the
/// stage `COPY`s a file of the repository to (the image's config file) is
/// that file's path in the repository, so the binary here reads it.
fn image_env(stage: &[(String, String)]) -> Vec<(String, String)> {
    let copied = copied(stage);
    stage
        .iter()
        .filter(|(i, _)| i == "ENV")
        .flat_map(|(_, rest)| rest.split_whitespace())
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| k.starts_with("FORGESYTE_"))
        .map(|(k, v)| {
            let v = v.trim_matches('"');
            let v = copied
                .get(v)
                .map_or_else(|| v.to_owned(), |p| p.display().to_string());
            (k.to_owned(), v)
        })
        .collect()
}

#[test]
fn the_kubernetes_manifests_and_the_dockerfile_match_the_binary() {
    let documents = documents();
    let config_map = config_map(&documents);
    let stage = runtime_stage();
    let image_env = image_env(&stage);
    let mut needs = Needs::default();

    // Every key of the ConfigMap's forgesyte.toml is an option of serve.
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("forgesyte.toml");
    std::fs::write(&file, &config_map.1).unwrap();
    let file = file.to_str().unwrap().to_owned();
    let config = effective(
        &["serve".into(), "--config".into(), file.clone()],
        &[],
        "ConfigMap",
    );
    let keys: toml::Table = config_map.1.parse().expect("the ConfigMap's TOML");
    assert!(!keys.is_empty());
    for (key, value) in &keys {
        assert_eq!(config.get(key), Some(value), "ConfigMap key {key}");
    }

    // The Deployments, CPU and GPU.
    let deployments = of_kind(&documents, "Deployment");
    let names: BTreeSet<&str> = deployments
        .iter()
        .map(|d| text(&d["metadata"]["name"]))
        .collect();
    assert!(
        names.iter().any(|n| n.contains("gpu")),
        "a GPU variant: {names:?}"
    );
    assert!(names.len() >= 2, "{names:?}");
    for deployment in &deployments {
        check_deployment(deployment, &config_map, &image_env, &mut needs);
    }

    // Services reach a named container port of the pods they select.
    let services = of_kind(&documents, "Service");
    assert!(!services.is_empty());
    for service in services {
        let selector = service["spec"]["selector"].as_object().expect("selector");
        let selected: Vec<&&Value> = deployments
            .iter()
            .filter(|d| {
                let labels = &d["spec"]["template"]["metadata"]["labels"];
                selector.iter().all(|(k, v)| &labels[k] == v)
            })
            .collect();
        assert!(!selected.is_empty(), "{service}: selects no Deployment");
        for port in service["spec"]["ports"].as_array().expect("ports") {
            for deployment in &selected {
                let container = &deployment["spec"]["template"]["spec"]["containers"][0];
                let ports = container["ports"].as_array().expect("ports");
                assert!(
                    ports.iter().any(|p| p["name"] == port["targetPort"]
                        || p["containerPort"] == port["targetPort"]),
                    "{service}: targetPort {} is not a port of the pods",
                    port["targetPort"]
                );
            }
        }
    }

    // The autoscaler scales one of them.
    let hpas = of_kind(&documents, "HorizontalPodAutoscaler");
    assert!(!hpas.is_empty());
    for hpa in hpas {
        let target = text(&hpa["spec"]["scaleTargetRef"]["name"]);
        assert!(names.contains(target), "HPA targets {target}: {names:?}");
    }

    // The Dockerfile: the command is accepted, EXPOSE is the listen port,
    // the health check asks a probe path, the user is not root.
    let exec_form = |instruction: &str| -> Vec<String> {
        let (_, rest) = stage
            .iter()
            .rev()
            .find(|(i, _)| i == instruction)
            .unwrap_or_else(|| panic!("no {instruction}"));
        serde_json::from_str(rest)
            .unwrap_or_else(|e| panic!("{instruction} is not in exec form ({e}): {rest}"))
    };
    let entrypoint = exec_form("ENTRYPOINT");
    // An init first: as PID 1 the server would inherit, and never reap,
    // the processes of runners that ended.
    assert_eq!(entrypoint[..2], ["/usr/bin/tini", "--"], "{entrypoint:?}");
    let installs = stage
        .iter()
        .any(|(i, rest)| i == "RUN" && rest.contains("install") && rest.contains(" tini"));
    assert!(installs, "the runtime stage installs no tini");
    assert!(entrypoint[2].ends_with("forgesyte"), "{entrypoint:?}");
    let command: Vec<String> = entrypoint[3..]
        .iter()
        .cloned()
        .chain(exec_form("CMD"))
        .collect();
    let config = effective(&command, &image_env, "Dockerfile CMD");
    // The image's defaults are its config file's, below anything given to
    // a container: no option in the command, no other variable.
    assert_eq!(command, ["serve"], "{command:?}");
    let names: Vec<&str> = image_env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["FORGESYTE_CONFIG"], "{image_env:?}");
    assert_eq!(config["plugins"].as_str(), Some("/plugins"), "{config}");
    assert_eq!(config["log-format"].as_str(), Some("json"), "{config}");
    let port = port_of(&config["bind"]);
    let exposed: Vec<&str> = stage
        .iter()
        .filter(|(i, _)| i == "EXPOSE")
        .flat_map(|(_, rest)| rest.split_whitespace())
        .collect();
    assert!(
        exposed.contains(&port.to_string().as_str()),
        "EXPOSE {exposed:?}, listens on {port}"
    );
    let user = stage
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, u)| u.split(':').next().unwrap_or_default().to_owned())
        .expect("a USER");
    assert!(user != "0" && user != "root", "runs as {user}");
    // The HEALTHCHECK runs a script the stage copies in (run below).
    let check: Vec<String> = stage
        .iter()
        .find(|(i, _)| i == "HEALTHCHECK")
        .and_then(|(_, rest)| rest.split_once("CMD "))
        .and_then(|(_, command)| serde_json::from_str(command).ok())
        .expect("a HEALTHCHECK whose CMD is in exec form");
    let copied = copied(&stage);
    let script = check
        .iter()
        .find_map(|arg| copied.get(arg.as_str()))
        .unwrap_or_else(|| panic!("HEALTHCHECK runs no file the image copies in: {check:?}"))
        .clone();

    // The probe paths answer on a server run with the ConfigMap (its
    // plugins directory replaced, its address by the helper's --bind).
    let plugins = tempfile::tempdir().unwrap();
    let server = Forgesyte::start(&[
        "--config",
        &file,
        "--plugins",
        plugins.path().to_str().unwrap(),
    ]);
    for path in &needs.probe_paths {
        let status = server.get(path).status;
        assert!(
            status == 200 || status == 503,
            "probe {path} answers {status}"
        );
    }
    assert!(needs.probe_paths.contains("/livez") && needs.probe_paths.contains("/readyz"));
    // The health check asks the address the configuration gives: the
    // image's file, or FORGESYTE_BIND over it (an unspecified address on
    // loopback); healthy while the server answers there, not elsewhere.
    let health_with = |bind: &str, env: &[(&str, &str)]| {
        let out = std::process::Command::new("python3")
            .arg(&script)
            .arg(env!("CARGO_BIN_EXE_forgesyte"))
            .envs(image_env.iter().map(|(k, v)| (k, v)))
            .env("FORGESYTE_BIND", bind)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let health = |bind: &str| health_with(bind, &[]);
    let serving = server.addr.port();
    assert_eq!(
        health(&format!("0.0.0.0:{serving}")),
        (Some(0), String::new())
    );
    // An admin token file gone since the start (`config --print` exits 2:
    // `serve` would refuse it now) does not make a serving server
    // unhealthy.
    assert_eq!(
        health_with(
            &format!("0.0.0.0:{serving}"),
            &[("FORGESYTE_ADMIN_TOKEN_FILE", "/nonexistent/forgesyte-token")]
        ),
        (Some(0), String::new())
    );
    assert_eq!(
        health(&format!("127.0.0.1:{serving}")),
        (Some(0), String::new())
    );
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let elsewhere = free.local_addr().unwrap().port();
    drop(free);
    let (code, stderr) = health(&format!("0.0.0.0:{elsewhere}"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{elsewhere}/livez")),
        "{stderr}"
    );
    // One scrape path for all (checked against the router by
    // `the_scrape_path_is_routed`).
    assert_eq!(needs.scrape_paths.len(), 1, "{:?}", needs.scrape_paths);
}

/// The scrape path the manifests annotate is routed: fails until the
/// server has a `/metrics` route.
#[test]
fn the_scrape_path_is_routed() {
    let documents = documents();
    let scrape: BTreeSet<String> = of_kind(&documents, "Deployment")
        .iter()
        .map(|d| {
            text(&d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]).to_owned()
        })
        .collect();
    assert_eq!(scrape.len(), 1, "{scrape:?}");
    let plugins = tempfile::tempdir().unwrap();
    let server = Forgesyte::start(&["--plugins", plugins.path().to_str().unwrap()]);
    for path in &scrape {
        let reply = server.get(path);
        assert!(
            reply.status != 404 && reply.status != 405,
            "the scrape path {path} is not routed: {} {}",
            reply.status,
            reply.text()
        );
    }
}

/// A CPU server run from the same plugins as a GPU one (`--no-gpu`, as
/// the CPU Deployment runs) is ready beside a plugin that requires a GPU:
/// that plugin is UNAVAILABLE, saying why, and does not count. Without the
/// option, on a machine with no GPU, it keeps the server out of service.
#[test]
fn a_server_without_gpu_plugins_is_ready_beside_one() {
    use crate::support::PluginsDir;
    use serde_json::json;
    let plugins = PluginsDir::new();
    plugins
        .good("alpha", json!({}))
        .good("gpu-one", json!({"requires_gpu": true}));
    let cpu = Forgesyte::start(&["--plugins", plugins.path_str(), "--no-gpu"]);
    cpu.wait_loaded();
    let health = cpu.get("/v1/plugins/gpu-one/health").json();
    assert_eq!(health["state"], "UNAVAILABLE", "{health}");
    let reason = health["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("Missing dependencies: gpu")
            && reason.contains("this server runs no GPU plugins (--no-gpu)"),
        "{reason}"
    );
    let ready = cpu.get("/readyz?verbose");
    assert_eq!(ready.status, 200, "{}", ready.text());
    let checks = ready.json()["checks"].clone();
    let gpu_check = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "plugin:gpu-one")
        .cloned()
        .unwrap_or_default();
    assert!(
        gpu_check["detail"]
            .as_str()
            .is_some_and(|d| d.ends_with("(optional: does not block readiness)")),
        "{gpu_check}"
    );
    assert_eq!(cpu.run("alpha", "echo", r#"{"args": {}}"#).status, 200);
    drop(cpu);

    let plain = Forgesyte::start(&["--plugins", plugins.path_str()]);
    plain.wait_loaded();
    let state = plain.get("/v1/plugins/gpu-one/health").json()["state"].clone();
    if state == "UNAVAILABLE" {
        assert_eq!(plain.get("/readyz").status, 503);
    } else {
        // A machine with a usable GPU: the plugin is served.
        assert_eq!(state, "INITIALIZED");
        println!("this machine has a GPU: the plugin requiring one is served");
    }
}

/// `deploy/build-image.sh` with fake engines first on `PATH` (so no real
/// one is ever started): it skips an engine whose `info` fails, builds with
/// the first working one, and exits 3 naming why when none works.
#[test]
fn build_image_uses_the_first_working_engine() {
    let bin = tempfile::tempdir().unwrap();
    let calls = bin.path().join("calls");
    let fake = |name: &str, info_ok: bool| {
        let body = format!(
            "if [ \"$1\" = info ]; then exit {}; fi\necho \"{name} $*\" >> '{}'",
            if info_ok { 0 } else { 1 },
            calls.display()
        );
        write_script(&bin.path().join(name), &body).unwrap();
    };
    let run = |args: &[&str]| {
        let path = format!(
            "{}:{}",
            bin.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let output = std::process::Command::new(repo().join("deploy/build-image.sh"))
            .args(args)
            .env("PATH", path)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
            std::fs::read_to_string(&calls).unwrap_or_default(),
        )
    };

    fake("podman", false);
    fake("docker", false);
    let (code, err, called) = run(&[]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("podman is installed but not usable"), "{err}");
    assert!(err.contains("no usable podman or docker"), "{err}");
    assert_eq!(called, "");

    fake("docker", true);
    let (code, err, called) = run(&["forgesyte-gpu:1", "--build-arg", "RUNTIME_BASE=x"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        called,
        "docker build --build-arg RUNTIME_BASE=x -t forgesyte-gpu:1 -f Dockerfile .\n"
    );
    std::fs::remove_file(&calls).unwrap();

    fake("podman", true);
    let version = env!("CARGO_PKG_VERSION");
    let (code, err, called) = run(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        called,
        format!("podman build --format docker -t forgesyte:{version} -f Dockerfile .\n")
    );
}
