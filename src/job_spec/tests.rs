use super::probe::PROBE;
use super::render::{render_cpu, render_duration, render_memory, Quantity};
use super::*;
use crate::model::{Constraint, JobKind, RestartMode};
use crate::model::{JobState, OnDisconnect, RestartPolicy};
use crate::resources::Resources;

const FULL: &str = "\
# web.yaml: three replicas of a web server.
name: web
kind: service
scheduler: service
priority: 100
replicas: 3
resources:
  cpu: 500m
  memory: 512Mi
image: busybox
command: [\"sh\", \"-c\"]
args: [\"echo hi && sleep 3600\"]
env:
  GREETING: hello
  PORT: 8080
  VERSION: 1.10
  DEBUG: true
constraints:
  - {label: zone, in: [a, b]}
  - label: disk
    not_in: [hdd]
  - {label: arch, equals: amd64}
spread: zone
anti_affinity: true
restart:
  policy: on_failure
  max_restarts: 3
  backoff: 2s
on_disconnect: keep_running
duration: 30s
";

const MINIMAL: &str = "\
name: train
kind: batch
tasks: 8
resources: {cpu: 4, memory: 16Gi}
image: trainer
";

fn err(text: &str) -> JobSpecError {
    match parse_job("job.yaml", text) {
        Ok(job) => panic!("expected an error, got {job:?}"),
        Err(e) => e,
    }
}

/// Asserts line and field, and that the message mentions each of `mentions`.
fn assert_err(text: &str, line: Option<usize>, field: Option<&str>, mentions: &[&str]) -> JobSpecError {
    let e = err(text);
    assert_eq!((e.line, e.field.as_deref()), (line, field), "{e}");
    for m in mentions {
        assert!(e.message.contains(m), "{:?} does not mention {m:?}", e.message);
    }
    assert!(!e.message.contains(PROBE), "{e}");
    e
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn full_example_parses_to_the_expected_job() {
    let job = parse_job("web.yaml", FULL).unwrap();
    let mut expected = Job::new("web", JobKind::Service, 3, Resources::new(500, 512 << 20));
    expected.submitted_at_ms = job.submitted_at_ms;
    expected.priority = 100;
    expected.image = "busybox".into();
    expected.command = strs(&["sh", "-c"]);
    expected.args = strs(&["echo hi && sleep 3600"]);
    expected.env = [("GREETING", "hello"), ("PORT", "8080"), ("VERSION", "1.10"), ("DEBUG", "true")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    expected.constraints = vec![
        Constraint::In { label: "zone".into(), values: strs(&["a", "b"]) },
        Constraint::NotIn { label: "disk".into(), values: strs(&["hdd"]) },
        Constraint::Equals { label: "arch".into(), value: "amd64".into() },
    ];
    expected.spread = Some("zone".into());
    expected.anti_affinity = true;
    expected.restart = RestartPolicy { mode: RestartMode::OnFailure, max_restarts: 3, backoff_ms: 2000 };
    expected.on_disconnect = OnDisconnect::KeepRunning;
    expected.duration_ms = Some(30_000);
    assert_eq!(job, expected);
    assert_eq!(job.state, JobState::Pending);
    assert!(job.submitted_at_ms > 0);
}

/// The examples in the module documentation are real job files.
#[test]
fn documented_examples_parse() {
    let doc: Vec<&str> = include_str!("mod.rs")
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .map(|l| l.strip_prefix("//!").unwrap().strip_prefix(' ').unwrap_or(""))
        .collect();
    let mut examples = Vec::new();
    let mut current: Option<String> = None;
    for line in doc {
        match (line, current.as_mut()) {
            ("```yaml", None) => current = Some(String::new()),
            ("```", Some(_)) => examples.push(current.take().unwrap()),
            (line, Some(text)) => text.push_str(&format!("{line}\n")),
            _ => {}
        }
    }
    assert_eq!(examples.len(), 2);
    let web = parse_job("web.yaml", &examples[0]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((web.tasks, web.constraints.len(), web.env["PORT"].as_str()), (3, 2, "8080"));
    assert_eq!((web.checks.len(), web.checks[1].name.as_str(), web.checks[0].unhealthy_threshold), (2, "ready", 2));
    let train = parse_job("train.yaml", &examples[1]).unwrap_or_else(|e| panic!("{e}"));
    assert!(train.gang && train.resources == Resources::new(4000, 16 << 30));
}

#[test]
fn defaults_follow_the_kind() {
    let job = parse_job("train.yaml", &format!("{MINIMAL}gang: true\n")).unwrap();
    assert_eq!((job.kind, job.scheduler.as_str(), job.tasks, job.gang), (JobKind::Batch, "batch", 8, true));
    assert_eq!(job.resources, Resources::new(4000, 16 << 30));
    assert_eq!(job.restart, RestartPolicy { mode: RestartMode::Never, max_restarts: 0, backoff_ms: 1000 });
    assert_eq!((job.priority, job.anti_affinity, job.duration_ms, job.spread.clone()), (0, false, None, None));
    assert!(job.command.is_empty() && job.args.is_empty() && job.env.is_empty() && job.constraints.is_empty());

    let service = "name: api\nkind: service\ntasks: 2\nresources: {cpu: '0.25', memory: 100M}\nimage: nginx\n\
                       scheduler: fast-lane\npriority: -5\nrestart: {backoff: 1500}\n";
    let job = parse_job("api.yaml", service).unwrap();
    assert_eq!((job.kind, job.tasks, job.scheduler.as_str(), job.priority), (JobKind::Service, 2, "fast-lane", -5));
    assert_eq!(job.resources, Resources::new(250, 100_000_000));
    assert_eq!(job.restart, RestartPolicy { mode: RestartMode::Always, max_restarts: 0, backoff_ms: 1500 });
    // `gang: false` asks for nothing, so a service may say it.
    assert!(parse_job("api.yaml", &format!("{service}gang: false\n")).is_ok());
    // A trailing or leading document marker and comments are fine.
    assert!(parse_job("t.yaml", &format!("# c\n---\n{MINIMAL}---\n")).is_ok());
}

#[test]
fn round_trip() {
    let mut odd = parse_job("train.yaml", MINIMAL).unwrap();
    odd.env = [("A", "yes"), ("B", "007"), ("C", ""), ("D", "x: y"), ("E", "~")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    odd.command = strs(&["-c", "#not a comment", "[x]", "null"]);
    odd.resources = Resources::new(1, 1536 << 20);
    odd.gang = true;
    odd.restart.backoff_ms = 90_500;
    odd.duration_ms = Some(0);
    odd.constraints = vec![Constraint::Equals { label: "zone".into(), value: "1.10".into() }];
    for job in [parse_job("web.yaml", FULL).unwrap(), parse_job("train.yaml", MINIMAL).unwrap(), odd] {
        let yaml = to_yaml(&job);
        let mut back = parse_job("rendered.yaml", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        back.submitted_at_ms = job.submitted_at_ms;
        assert_eq!(back, job, "{yaml}");
    }
}

#[test]
fn to_yaml_renders_canonical_forms() {
    let yaml = to_yaml(&parse_job("web.yaml", FULL).unwrap());
    for line in ["name: web\n", "replicas: 3\n", "  cpu: 500m\n", "  memory: 512Mi\n", "  backoff: 2s\n"] {
        assert!(yaml.contains(line), "{line:?} not in\n{yaml}");
    }
    assert!(yaml.contains("PORT: '8080'") || yaml.contains("PORT: \"8080\""), "{yaml}");
    assert!(!yaml.contains("tasks:") && !yaml.contains("gang") && !yaml.contains("submitted"), "{yaml}");
    let yaml = to_yaml(&parse_job("train.yaml", MINIMAL).unwrap());
    assert!(yaml.contains("tasks: 8\n") && yaml.contains("  cpu: 4\n") && yaml.contains("memory: 16Gi"), "{yaml}");
    assert!(yaml.contains("policy: never") && !yaml.contains("priority"), "{yaml}");
    assert!(!yaml.contains("on_disconnect"), "the default is not written: {yaml}");

    assert!(matches!(render_cpu(1500), Quantity::Text(s) if s == "1500m"));
    assert!(matches!(render_cpu(2000), Quantity::Number(2)));
    assert!(matches!(render_memory(1536 << 20), Quantity::Text(s) if s == "1536Mi"));
    assert!(matches!(render_memory(3 << 40), Quantity::Text(s) if s == "3Ti"));
    assert!(matches!(render_memory(1000), Quantity::Number(1000)));
    assert_eq!(
        [0, 1500, 2000, 90_000, 3_600_000].map(render_duration),
        ["0s", "1500ms", "2s", "90s", "1h"].map(String::from)
    );
}

#[test]
fn unknown_fields_are_errors_with_the_expected_list() {
    let text = MINIMAL.replace("tasks: 8", "tasks: 8\nreplica: 3");
    let e = assert_err(&text, Some(4), Some("replica"), &["did you mean `replicas`?", "`name`, `kind`"]);
    assert_eq!(e.column, Some(1));
    assert!(e.to_string().starts_with("job.yaml:4:1: replica: unknown field (did you mean"), "{e}");

    let text = "name: a\nkind: batch\ntasks: 1\nimage: x\nresources:\n  cpu: 1\n  gpu: 1\n  memory: 1Gi\n";
    let e = assert_err(text, Some(7), Some("resources.gpu"), &["expected `cpu` or `memory`"]);
    assert_eq!(e.column, Some(3));

    let text = format!("{MINIMAL}constraints:\n  - {{label: zone, equals: a}}\n  - {{label: zone, value: a}}\n");
    let e = assert_err(&text, Some(8), Some("constraints[1].value"), &["`label`, `equals`, `in`, `not_in`"]);
    assert_eq!(e.column, Some(19));

    let text = format!("{MINIMAL}restart:\n  policy: always\n  max_retries: 2\n");
    assert_err(&text, Some(8), Some("restart.max_retries"), &["`max_restarts`"]);
    assert_err(&format!("{MINIMAL}<<: {{priority: 1}}\n"), Some(6), Some("<<"), &["merge keys"]);
}

#[test]
fn bad_values_point_at_the_value() {
    let cpu = MINIMAL.replace("cpu: 4", "cpu: 5x");
    let e = assert_err(&cpu, Some(4), Some("resources.cpu"), &["`5x`", "`500m`", "`0.5`"]);
    assert_eq!(e.column, Some(18));
    let text = "name: a\nkind: batch\ntasks: 1\nimage: x\nresources:\n  cpu: 0\n  memory: 1Gi\n";
    assert_err(text, Some(6), Some("resources.cpu"), &["more than 0"]);
    let text = "name: a\nkind: batch\ntasks: 1\nimage: x\nresources:\n  cpu: 1\n  memory: 512MB\n";
    assert_err(text, Some(7), Some("resources.memory"), &["`512M`", "`512Mi`"]);
    let text = "name: a\nkind: batch\ntasks: 1\nimage: x\nresources:\n  cpu: 1\n  memory: [1]\n";
    assert_err(text, Some(7), Some("resources.memory"), &["invalid type: sequence", "`512Mi`"]);

    assert_err(&MINIMAL.replace("tasks: 8", "tasks: 0"), Some(3), Some("tasks"), &["1 to 100000"]);
    assert_err(&MINIMAL.replace("tasks: 8", "tasks: 100001"), Some(3), Some("tasks"), &["out of range"]);
    assert_err(&MINIMAL.replace("tasks: 8", "tasks: many"), Some(3), Some("tasks"), &["`many`"]);
    assert_err(&MINIMAL.replace("tasks: 8", "tasks:"), Some(3), Some("tasks"), &["no value given; expected"]);
    assert_err(&MINIMAL.replace("tasks: 8", "tasks: -1"), Some(3), Some("tasks"), &["-1 is out of range"]);
    assert_err(&MINIMAL.replace("tasks: 8", "tasks: 2.5"), Some(3), Some("tasks"), &["whole number"]);
    assert_eq!(parse_job("t", &MINIMAL.replace("tasks: 8", "tasks: \"8\"")).unwrap().tasks, 8);
    assert_err(&MINIMAL.replace("name: train", "name: a/b"), Some(1), Some("name"), &["job name \"a/b\""]);
    assert_err(&MINIMAL.replace("kind: batch", "kind: cron"), Some(2), Some("kind"), &["`batch`", "`service`"]);
    assert_err(&MINIMAL.replace("image: trainer", "image:"), Some(5), Some("image"), &["must not be empty"]);
    assert_err(&format!("{MINIMAL}gang: yes\n"), Some(6), Some("gang"), &["`true` or `false`"]);
    assert_err(&format!("{MINIMAL}spread: ''\n"), Some(6), Some("spread"), &["must not be empty"]);
    assert_err(&format!("{MINIMAL}command: echo hi\n"), Some(6), Some("command"), &["a list of strings"]);
    assert_err(
        &format!("{MINIMAL}restart: {{policy: sometimes}}\n"),
        Some(6),
        Some("restart.policy"),
        &["`on_failure`"],
    );
    assert_err(&format!("{MINIMAL}duration: 5 minutes\n"), Some(6), Some("duration"), &["`1m30s`"]);
    assert_err(
        &format!("{MINIMAL}constraints:\n- {{label: zone, in: []}}\n"),
        Some(7),
        Some("constraints[0].in"),
        &["at least one value"],
    );
    assert_err(
        &format!("{MINIMAL}constraints: {{label: zone}}\n"),
        Some(6),
        Some("constraints"),
        &["a list of constraints"],
    );
}

#[test]
fn env_values_are_taken_as_written_and_names_checked() {
    let job = parse_job("t", &format!("{MINIMAL}env: {{A: 1, B: false, C: 0x10, D: '', E: 1e3}}\n")).unwrap();
    let values: Vec<&str> = job.env.values().map(String::as_str).collect();
    assert_eq!(values, ["1", "false", "0x10", "", "1e3"]);
    assert_err(&format!("{MINIMAL}env:\n  A=B: 1\n"), Some(7), Some("env"), &["`A=B`", "`=`"]);
    assert_err(&format!("{MINIMAL}env:\n  A: 1\n  A: 2\n"), Some(8), Some("env"), &["`A` is set twice"]);
    assert_err(&format!("{MINIMAL}env:\n  A: [1]\n"), Some(7), Some("env.A"), &["invalid type: sequence"]);
}

#[test]
fn missing_fields_are_named() {
    let e = assert_err(&MINIMAL.replace("image: trainer\n", ""), None, Some("image"), &["`image: busybox`"]);
    assert_eq!(e.to_string(), format!("job.yaml: image: {}", e.message));
    assert_err(&MINIMAL.replace("name: train\n", ""), None, Some("name"), &["missing"]);
    assert_err(&MINIMAL.replace("kind: batch\n", ""), None, Some("kind"), &["`batch`"]);
    assert_err(&MINIMAL.replace("tasks: 8\n", ""), None, Some("tasks"), &["`tasks: 3`"]);
    assert_err(&MINIMAL.replace("resources: {cpu: 4, memory: 16Gi}\n", ""), None, Some("resources"), &["cpu"]);
    let text = "name: a\nkind: batch\ntasks: 1\nresources:\n  memory: 1Gi\nimage: x\n";
    assert_err(text, Some(4), Some("resources.cpu"), &["millicores"]);
    let text = "name: a\nkind: batch\ntasks: 1\nresources: {cpu: 1}\nimage: x\n";
    assert_err(text, Some(4), Some("resources.memory"), &["512Mi"]);
}

#[test]
fn cross_field_rules_point_at_the_offending_key() {
    let text = "name: web\nkind: service\nreplicas: 2\nresources: {cpu: 1, memory: 1Gi}\n\
                    image: x\ngang: true\n";
    let e = assert_err(text, Some(6), Some("gang"), &["only for batch"]);
    assert_eq!(e.column, Some(1));
    // The gang comes before the kind: still found.
    let text = "gang: true\nname: web\nkind: service\nreplicas: 2\nresources: {cpu: 1, memory: 1Gi}\nimage: x\n";
    assert_err(text, Some(1), Some("gang"), &["only for batch"]);

    let text = "name: web\nkind: service\nreplicas: 2\nresources: {cpu: 1, memory: 1Gi}\nimage: x\ntasks: 2\n";
    assert_err(text, Some(6), Some("tasks"), &["give only one"]);
    assert_err(&format!("{MINIMAL}replicas: 8\n"), Some(6), Some("replicas"), &["give only one"]);
    assert_err(&MINIMAL.replace("tasks: 8", "replicas: 8"), Some(3), Some("replicas"), &["batch job counts"]);
}

#[test]
fn constraint_rules() {
    let two_ops = format!("{MINIMAL}constraints:\n  - label: zone\n    equals: a\n    in: [a, b]\n");
    let e = assert_err(&two_ops, Some(9), Some("constraints[0].in"), &["exactly one", "`equals` and `in`"]);
    assert_eq!(e.column, Some(5));
    let flow =
        format!("{MINIMAL}constraints:\n  - {{label: zone, equals: a}}\n  - {{not_in: [c], label: z, equals: b}}\n");
    let e = assert_err(&flow, Some(8), Some("constraints[1].equals"), &["`equals` and `not_in`"]);
    assert_eq!(e.column, Some(29));
    assert_err(
        &format!("{MINIMAL}constraints:\n  - {{label: zone}}\n"),
        Some(7),
        Some("constraints[0]"),
        &["needs one of"],
    );
    assert_err(
        &format!("{MINIMAL}constraints:\n  - {{equals: a}}\n"),
        Some(7),
        Some("constraints[0].label"),
        &["missing `label`"],
    );
    assert_err(
        &format!("{MINIMAL}constraints:\n  - {{label: '', equals: a}}\n"),
        Some(7),
        Some("constraints[0].label"),
        &["must not be empty"],
    );
}

#[test]
fn duplicate_fields_point_at_the_repetition() {
    assert_err(&format!("{MINIMAL}name: again\n"), Some(6), Some("name"), &["given twice"]);
    let text = "name: a\nkind: batch\ntasks: 1\nimage: x\nresources:\n  cpu: 1\n  memory: 1Gi\n  cpu: 2\n";
    assert_err(text, Some(8), Some("resources.cpu"), &["given twice"]);
}

#[test]
fn file_level_errors() {
    let e = assert_err("name: a\nkind: batch\n  tasks: 1\n", Some(3), None, &["invalid YAML"]);
    assert!(e.column.is_some());
    assert!(e.to_string().starts_with("job.yaml:3:"), "{e}");
    let e = assert_err("name: a\nkind:\tbatch\n\ttasks: 1\n", Some(3), None, &["invalid YAML", "tab"]);
    assert!(!e.message.contains("line 3"), "{e}");
    assert_err("name: [a\n", Some(2), None, &["invalid YAML"]);
    assert_err("", None, None, &["no job"]);
    assert_err("# just a comment\n---\n", None, None, &["no job"]);
    assert_err(&format!("{MINIMAL}---\n{MINIMAL}"), Some(7), None, &["second YAML document"]);
    assert_err("- name: a\n", Some(1), None, &["invalid type: sequence", "a job: a mapping"]);
}

#[test]
fn display_omits_what_is_unknown() {
    let mut e = JobSpecError {
        source_name: "jobs.yaml".into(),
        line: Some(7),
        column: Some(3),
        field: Some("resources.cpu".into()),
        message: "bad".into(),
    };
    assert_eq!(e.to_string(), "jobs.yaml:7:3: resources.cpu: bad");
    e.column = None;
    assert_eq!(e.to_string(), "jobs.yaml:7: resources.cpu: bad");
    e.field = None;
    assert_eq!(e.to_string(), "jobs.yaml:7: bad");
    e.line = None;
    assert_eq!(e.to_string(), "jobs.yaml: bad");
    e.source_name.clear();
    assert_eq!(e.to_string(), "bad");
}

#[test]
fn control_characters_are_refused_where_they_make_no_sense() {
    let e = assert_err(
        &format!("{MINIMAL}env:\n  A: \"x\\0y\"\n"),
        Some(7),
        Some("env.A"),
        &["NUL (U+0000)", "character 2"],
    );
    assert_eq!(e.column, Some(6));
    assert_err(&format!("{MINIMAL}env:\n  \"A\\x01\": x\n"), Some(7), Some("env"), &["U+0001", "no control character"]);
    assert_err(&format!("{MINIMAL}env:\n  \"A B\": x\n"), Some(7), Some("env"), &["whitespace"]);
    assert_err(&format!("{MINIMAL}env:\n  A: \"\\e[1m\"\n"), Some(7), Some("env.A"), &["U+001B", "tab, newline"]);
    assert_err(&format!("{MINIMAL}args: [\"a\\0\"]\n"), Some(6), Some("args[0]"), &["NUL"]);
    assert_err(
        &format!("{MINIMAL}constraints: [{{label: zone, equals: \"a\\tb\"}}]\n"),
        Some(6),
        Some("constraints[0].equals"),
        &["U+0009"],
    );
    assert_err(&format!("{MINIMAL}spread: \"zo\\0ne\"\n"), Some(6), Some("spread"), &["NUL"]);
    assert_err(&MINIMAL.replace("image: trainer", "image: \"trainer\\0\""), Some(5), Some("image"), &["NUL"]);
    // Line breaks and tabs are text in values and arguments.
    let job = parse_job("t", &format!("{MINIMAL}env: {{A: \"a\\tb\\nc\"}}\nargs: [\"x\\ny\"]\n")).unwrap();
    assert_eq!((job.env["A"].as_str(), job.args[0].as_str()), ("a\tb\nc", "x\ny"));
}

#[test]
fn deep_or_huge_files_are_refused_before_parsing() {
    let text = format!("{MINIMAL}args: {}\n", "[".repeat(100_000));
    let e = assert_err(&text, Some(6), None, &["deeper than 32 levels"]);
    assert_eq!(e.column, Some(7 + MAX_DEPTH - 1));
    let text = format!("{MINIMAL}args:\n{}x\n", "- ".repeat(100_000));
    assert_err(&text, Some(7), None, &["deeper than 32 levels"]);
    let e = err(&format!("{MINIMAL}# {}\n", "x".repeat(MAX_FILE_BYTES)));
    assert!(e.line.is_none() && e.message.contains("at most 4194304 bytes"), "{e}");
}

#[test]
fn a_job_too_large_for_one_etcd_request_is_refused_at_its_largest_field() {
    let blob = "x".repeat(1_600_000);
    let e = assert_err(
        &format!("{MINIMAL}env:\n  SMALL: a\n  BLOB: {blob}\n"),
        Some(8),
        Some("env.BLOB"),
        &["more than fits one etcd request", "1.44 MiB", "--max-request-bytes"],
    );
    assert_eq!(e.column, Some(3));
    let args: Vec<String> = (0..25_000).map(|i| format!("arg-{i:060}")).collect();
    assert_err(&format!("{MINIMAL}args: [{}]\n", args.join(", ")), Some(6), Some("args"), &["this field alone"]);
    // Just under the limit is fine.
    assert!(parse_job("t", &format!("{MINIMAL}env:\n  BLOB: {}\n", "x".repeat(1_400_000))).is_ok());
}

#[test]
fn on_disconnect_defaults_to_stop_and_names_both_choices_when_wrong() {
    assert_eq!(parse_job("t.yaml", MINIMAL).unwrap().on_disconnect, OnDisconnect::Stop);
    let keep = parse_job("t.yaml", &format!("{MINIMAL}on_disconnect: keep_running\n")).unwrap();
    assert_eq!(keep.on_disconnect, OnDisconnect::KeepRunning);
    assert!(to_yaml(&keep).contains("on_disconnect: keep_running\n"), "{}", to_yaml(&keep));
    assert_err(
        &format!("{MINIMAL}on_disconnect: keep\n"),
        Some(6),
        Some("on_disconnect"),
        &["`stop`", "`keep_running`"],
    );
}

#[test]
fn a_job_record_without_on_disconnect_still_decodes_and_stops() {
    let mut value = serde_json::to_value(parse_job("t.yaml", MINIMAL).unwrap()).unwrap();
    assert!(value.get("on_disconnect").is_none(), "the default is not stored: {value}");
    value.as_object_mut().unwrap().remove("on_disconnect");
    let job: crate::model::Job = serde_json::from_value(value).unwrap();
    assert_eq!(job.on_disconnect, OnDisconnect::Stop);
}

#[test]
fn update_block_parses_renders_and_is_checked() {
    let text = "name: web\nkind: service\nreplicas: 4\nresources: {cpu: 100m, memory: 32Mi}\nimage: busybox\n\
                update:\n  max_parallel: 2\n  min_healthy_time: 3s\n  canary: 1\n  auto_revert: true\n";
    let job = parse_job("web.yaml", text).unwrap();
    let u = job.update.unwrap();
    assert_eq!(
        (u.max_parallel, u.min_healthy_time_ms, u.canary, u.auto_revert, u.auto_promote),
        (2, 3000, 1, true, false)
    );
    assert_eq!(u.healthy_deadline_ms, 300_000, "defaults are Nomad's");
    let again = parse_job("web.yaml", &crate::job_spec::to_yaml(&job)).unwrap();
    assert_eq!(again.update, job.update);

    let e = err(&text.replace("canary: 1", "canary: 9"));
    assert!(e.to_string().contains("update.canary") && e.to_string().contains(":9:"), "{e}");
    let e = err(&text.replace("max_parallel: 2", "max_parallel: lots"));
    assert!(e.to_string().contains(":7:"), "{e}");
    let e = err(&text.replace("auto_revert: true", "auto_revert: yes please"));
    assert!(e.to_string().contains(":10:"), "{e}");
    let batch = "name: b\nkind: batch\ntasks: 1\nresources: {cpu: 1, memory: 1Mi}\nimage: x\nupdate: {canary: 1}\n";
    let e = err(batch);
    assert!(e.to_string().contains("only for services"), "{e}");
}

#[test]
fn checks_parse_with_their_defaults() {
    use crate::health::{HealthCheck, Probe};
    let text = format!(
        "{MINIMAL}checks:\n  - type: http\n    port: 8080\n    path: /health\n    expect_status: 204\n    \
         interval: 5s\n    timeout: 500ms\n    healthy_threshold: 2\n    unhealthy_threshold: 4\n    grace: 30s\n    \
         restart: false\n  - {{type: tcp, port: 5432}}\n  - {{name: ready, type: exec, command: [cat, /tmp/ready]}}\n"
    );
    let job = parse_job("t.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    let http = HealthCheck {
        name: "http".into(),
        probe: Probe::Http { port: 8080, path: "/health".into(), expect_status: Some(204) },
        interval_ms: 5000,
        timeout_ms: 500,
        healthy_threshold: 2,
        unhealthy_threshold: 4,
        grace_ms: 30_000,
        restart: false,
    };
    let tcp = HealthCheck::new("tcp", Probe::Tcp { port: 5432 });
    let exec = HealthCheck::new("ready", Probe::Exec { command: strs(&["cat", "/tmp/ready"]) });
    assert_eq!(job.checks, vec![http, tcp, exec]);
    assert_eq!(
        (job.checks[1].interval_ms, job.checks[1].timeout_ms, job.checks[1].unhealthy_threshold, job.checks[1].restart),
        (10_000, 2_000, 3, true),
        "the defaults"
    );

    // One check may be given as a mapping; an http check's path defaults to `/`.
    let one = parse_job("t.yaml", &format!("{MINIMAL}check: {{type: http, port: 80}}\n")).unwrap();
    assert_eq!(
        one.checks,
        vec![HealthCheck::new("http", Probe::Http { port: 80, path: "/".into(), expect_status: None })]
    );
    assert!(parse_job("t.yaml", MINIMAL).unwrap().checks.is_empty());

    // Rendered back as a list with only what differs from the defaults, and read back the same.
    let yaml = to_yaml(&job);
    assert!(yaml.contains("checks:\n"), "{yaml}");
    assert!(!yaml.contains("name: http") && yaml.contains("name: ready"), "{yaml}");
    assert!(yaml.contains("interval: 5s") && yaml.contains("grace: 30s") && yaml.contains("restart: false"), "{yaml}");
    let mut back = parse_job("rendered.yaml", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    back.submitted_at_ms = job.submitted_at_ms;
    assert_eq!(back, job, "{yaml}");
    let yaml = to_yaml(&one);
    assert!(yaml.contains("checks:\n- type: http\n  port: 80\n"), "{yaml}");
}

#[test]
fn bad_checks_point_at_the_line_and_field() {
    // Both forms.
    let text = format!("{MINIMAL}check: {{type: tcp, port: 1}}\nchecks: [{{type: tcp, port: 2}}]\n");
    assert_err(&text, Some(7), Some("checks"), &["not both"]);
    // What a check lacks is pointed at the check itself.
    let text = format!("{MINIMAL}checks:\n  - {{type: tcp, port: 1}}\n  - port: 2\n");
    assert_err(&text, Some(8), Some("checks[1].type"), &["missing `type`", "`http`"]);
    let text = format!("{MINIMAL}checks:\n  - type: http\n    path: /x\n");
    assert_err(&text, Some(7), Some("checks[0].port"), &["missing `port`", "node's network"]);
    assert_err(&format!("{MINIMAL}check: {{type: tcp}}\n"), Some(6), Some("check.port"), &["missing `port`"]);
    assert_err(&format!("{MINIMAL}check:\n  type: exec\n"), Some(6), Some("check.command"), &["missing `command`"]);
    let text = format!("{MINIMAL}check:\n  type: exec\n  command: []\n");
    assert_err(&text, Some(8), Some("check.command"), &["empty"]);
    // Bad values point at the value.
    let text = format!("{MINIMAL}checks:\n  - type: grpc\n");
    assert_err(&text, Some(7), Some("checks[0].type"), &["unknown check type `grpc`", "`exec`"]);
    let text = format!("{MINIMAL}checks:\n  - type: tcp\n    port: 70000\n");
    assert_err(&text, Some(8), Some("checks[0].port"), &["1 to 65535"]);
    let text = format!("{MINIMAL}checks:\n  - {{type: http, port: 80, path: health}}\n");
    assert_err(&text, Some(7), Some("checks[0].path"), &["must start with `/`"]);
    let text = format!("{MINIMAL}checks:\n  - {{type: http, port: 80, expect_status: 700}}\n");
    assert_err(&text, Some(7), Some("checks[0].expect_status"), &["100 to 599"]);
    let text = format!("{MINIMAL}checks:\n  - type: tcp\n    port: 80\n    interval: 0s\n");
    assert_err(&text, Some(9), Some("checks[0].interval"), &["more than 0"]);
    let text = format!("{MINIMAL}checks:\n  - type: tcp\n    port: 80\n    timeout: soon\n");
    assert_err(&text, Some(9), Some("checks[0].timeout"), &["`soon`"]);
    let text = format!("{MINIMAL}checks:\n  - type: tcp\n    port: 80\n    unhealthy_threshold: 0\n");
    assert_err(&text, Some(9), Some("checks[0].unhealthy_threshold"), &["1 to 1000"]);
    let text = format!("{MINIMAL}checks:\n  - type: tcp\n    port: 80\n    restart: yes\n");
    assert_err(&text, Some(9), Some("checks[0].restart"), &["`true` or `false`"]);
    let text = format!("{MINIMAL}checks:\n  - type: tcp\n    port: 80\n    intervall: 5s\n");
    assert_err(&text, Some(9), Some("checks[0].intervall"), &["did you mean `interval`?"]);
    assert_err(&format!("{MINIMAL}checks: {{type: tcp}}\n"), Some(6), Some("checks"), &["a list of health checks"]);
    // Fields of another type's check are errors, at the field.
    let text = format!("{MINIMAL}checks:\n  - type: tcp\n    port: 80\n    path: /x\n");
    assert_err(&text, Some(9), Some("checks[0].path"), &["only for http checks", "`type: tcp`"]);
    let text = format!("{MINIMAL}checks:\n  - type: exec\n    command: [\"true\"]\n    port: 80\n");
    assert_err(&text, Some(9), Some("checks[0].port"), &["only for http and tcp checks"]);
    let text = format!("{MINIMAL}checks:\n  - type: http\n    port: 80\n    command: [x]\n");
    assert_err(&text, Some(9), Some("checks[0].command"), &["only for exec checks"]);
    // Two checks with one name.
    let text = format!("{MINIMAL}checks:\n  - {{type: tcp, port: 1}}\n  - {{type: tcp, port: 2}}\n");
    assert_err(&text, Some(8), Some("checks[1]"), &["a second check named `tcp`", "`name`"]);
    let text =
        format!("{MINIMAL}checks:\n  - {{name: a, type: tcp, port: 1}}\n  - name: a\n    type: tcp\n    port: 2\n");
    assert_err(&text, Some(8), Some("checks[1].name"), &["a second check named `a`"]);
    let text = format!("{MINIMAL}checks:\n  - {{name: 'a b', type: tcp, port: 1}}\n");
    assert_err(&text, Some(7), Some("checks[0].name"), &["check name"]);
}

#[test]
fn ports_and_services_parse_and_render() {
    let text = format!(
        "{MINIMAL}ports: {{http: 8080, admin: \"9090\"}}\nservices:\n  - {{name: web, port: http, tags: [v2, primary]}}\n  - name: web-admin\n    port: admin\n"
    );
    let job = parse_job("job.yaml", &text).expect("parses");
    assert_eq!(job.ports, [("admin".to_string(), 9090), ("http".to_string(), 8080)].into());
    assert_eq!(job.services.len(), 2);
    assert_eq!(job.services[0].name, "web");
    assert_eq!(job.services[0].port, "http");
    assert_eq!(job.services[0].tags, strs(&["v2", "primary"]));
    assert!(job.services[1].tags.is_empty());
    let yaml = to_yaml(&job);
    let mut back = parse_job("job.yaml", &yaml).expect("the rendering parses");
    back.submitted_at_ms = job.submitted_at_ms;
    assert_eq!(back, job, "{yaml}");
    assert!(yaml.contains("ports:\n  admin: 9090\n  http: 8080\n"), "{yaml}");
    // Without them nothing is rendered.
    let plain = parse_job("job.yaml", MINIMAL).expect("parses");
    assert!(plain.ports.is_empty() && plain.services.is_empty());
    assert!(!to_yaml(&plain).contains("ports") && !to_yaml(&plain).contains("services"));
}

#[test]
fn bad_ports_and_services_point_at_the_line_and_field() {
    assert_err(&format!("{MINIMAL}ports: {{http: 70000}}\n"), Some(6), Some("ports.http"), &["1 to 65535"]);
    assert_err(&format!("{MINIMAL}ports: {{http: 0}}\n"), Some(6), Some("ports.http"), &["1 to 65535"]);
    assert_err(&format!("{MINIMAL}ports:\n  http: web\n"), Some(7), Some("ports.http"), &["not a whole number"]);
    assert_err(&format!("{MINIMAL}ports:\n  'a b': 80\n"), Some(7), Some("ports"), &["port name"]);
    assert_err(&format!("{MINIMAL}ports: [80]\n"), Some(6), Some("ports"), &["port names to port numbers"]);
    let ports = "ports: {http: 8080}\n";
    let text = format!("{MINIMAL}{ports}services:\n  - {{name: web, port: grpc}}\n");
    assert_err(&text, Some(8), Some("services[0].port"), &["`grpc` is not one of the job's `ports`", "`http`"]);
    let text = format!("{MINIMAL}services:\n  - {{name: web, port: http}}\n");
    assert_err(&text, Some(7), Some("services[0].port"), &["declares none"]);
    let text = format!("{MINIMAL}{ports}services:\n  - {{port: http}}\n");
    assert_err(&text, Some(8), Some("services[0].name"), &["missing `name`"]);
    let text = format!("{MINIMAL}{ports}services:\n  - name: web\n");
    assert_err(&text, Some(8), Some("services[0].port"), &["missing `port`"]);
    let text = format!("{MINIMAL}{ports}services:\n  - {{name: 'web/x', port: http}}\n");
    assert_err(&text, Some(8), Some("services[0].name"), &["service name"]);
    let text = format!("{MINIMAL}{ports}services:\n  - {{name: web, port: http}}\n  - name: web\n    port: http\n");
    assert_err(&text, Some(9), Some("services[1].name"), &["a second service named `web`"]);
    let text = format!("{MINIMAL}{ports}services:\n  - {{name: web, port: http, tags: ['a b']}}\n");
    assert_err(&text, Some(8), Some("services[0].tags[0]"), &["one word"]);
    let text = format!("{MINIMAL}{ports}services:\n  - {{name: web, port: http, tag: [a]}}\n");
    assert_err(&text, Some(8), Some("services[0].tag"), &["did you mean `tags`?"]);
}
