//! The file as read: every field optional, so that a missing one is reported in our words, not serde's.

use super::MAX_TASKS;
use crate::keys::validate_name;
use crate::model::{JobKind, OnDisconnect, RestartMode};
use crate::units::{parse_cpu, parse_duration_ms, parse_memory};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a job: a mapping with `name`, `kind`, `tasks` (or `replicas`), `resources` and `image`"
)]
pub(super) struct RawJob {
    #[serde(default, deserialize_with = "de_job_name")]
    pub(super) name: Option<String>,
    #[serde(default, deserialize_with = "de_kind")]
    pub(super) kind: Option<JobKind>,
    #[serde(default, deserialize_with = "de_namespace")]
    pub(super) namespace: Option<String>,
    #[serde(default, deserialize_with = "de_scheduler")]
    pub(super) scheduler: Option<String>,
    #[serde(default, deserialize_with = "de_priority")]
    pub(super) priority: Option<i32>,
    #[serde(default, deserialize_with = "de_count")]
    pub(super) tasks: Option<u32>,
    #[serde(default, deserialize_with = "de_count")]
    pub(super) replicas: Option<u32>,
    #[serde(default)]
    pub(super) resources: Option<RawResources>,
    #[serde(default, deserialize_with = "de_image")]
    pub(super) image: Option<String>,
    #[serde(default, deserialize_with = "de_list")]
    pub(super) command: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_list")]
    pub(super) args: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_env")]
    pub(super) env: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "de_constraints")]
    pub(super) constraints: Option<Vec<RawConstraint>>,
    #[serde(default, deserialize_with = "de_label")]
    pub(super) spread: Option<String>,
    #[serde(default, deserialize_with = "de_bool")]
    pub(super) anti_affinity: Option<bool>,
    #[serde(default, deserialize_with = "de_bool")]
    pub(super) gang: Option<bool>,
    #[serde(default)]
    pub(super) restart: Option<RawRestart>,
    #[serde(default, deserialize_with = "de_on_disconnect")]
    pub(super) on_disconnect: Option<OnDisconnect>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) duration: Option<u64>,
    #[serde(default)]
    pub(super) check: Option<RawCheck>,
    #[serde(default, deserialize_with = "de_checks")]
    pub(super) checks: Option<Vec<RawCheck>>,
    #[serde(default)]
    pub(super) update: Option<RawUpdate>,
    #[serde(default, deserialize_with = "de_ports")]
    pub(super) ports: Option<BTreeMap<String, u16>>,
    #[serde(default, deserialize_with = "de_services")]
    pub(super) services: Option<Vec<RawService>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service: a mapping with `name`, `port` (one of `ports`) and optional `tags`, e.g. \
                 `{name: web, port: http, tags: [v2]}`"
)]
pub(super) struct RawService {
    #[serde(default, deserialize_with = "de_service_name")]
    pub(super) name: Option<String>,
    #[serde(default, deserialize_with = "de_port_name")]
    pub(super) port: Option<String>,
    #[serde(default, deserialize_with = "de_tags")]
    pub(super) tags: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `max_parallel`, `min_healthy_time`, `healthy_deadline`, `progress_deadline`, \
                 `canary`, `auto_promote` and `auto_revert`, e.g. `{max_parallel: 2, auto_revert: true}`"
)]
pub(super) struct RawUpdate {
    #[serde(default, deserialize_with = "de_count")]
    pub(super) max_parallel: Option<u32>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) min_healthy_time: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) healthy_deadline: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) progress_deadline: Option<u64>,
    #[serde(default, deserialize_with = "de_max_restarts")]
    pub(super) canary: Option<u32>,
    #[serde(default, deserialize_with = "de_bool")]
    pub(super) auto_promote: Option<bool>,
    #[serde(default, deserialize_with = "de_bool")]
    pub(super) auto_revert: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `cpu` and `memory`, e.g. `{cpu: 500m, memory: 512Mi}`")]
pub(super) struct RawResources {
    #[serde(default, deserialize_with = "de_cpu")]
    pub(super) cpu: Option<u64>,
    #[serde(default, deserialize_with = "de_memory")]
    pub(super) memory: Option<u64>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a constraint: a mapping with `label` and one of `equals`, `in`, `not_in`, e.g. \
                 `{label: zone, equals: a}`"
)]
pub(super) struct RawConstraint {
    #[serde(default, deserialize_with = "de_label")]
    pub(super) label: Option<String>,
    #[serde(default, deserialize_with = "de_text")]
    pub(super) equals: Option<String>,
    #[serde(default, rename = "in", deserialize_with = "de_values")]
    pub(super) in_: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_values")]
    pub(super) not_in: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `policy`, `max_restarts` and `backoff`, e.g. `{policy: on_failure, max_restarts: 3}`"
)]
pub(super) struct RawRestart {
    #[serde(default, deserialize_with = "de_policy")]
    pub(super) policy: Option<RestartMode>,
    #[serde(default, deserialize_with = "de_max_restarts")]
    pub(super) max_restarts: Option<u32>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) backoff: Option<u64>,
}

/// What a check probes (`type:`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CheckType {
    Http,
    Tcp,
    Exec,
}

impl CheckType {
    pub(super) fn name(self) -> &'static str {
        match self {
            CheckType::Http => "http",
            CheckType::Tcp => "tcp",
            CheckType::Exec => "exec",
        }
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a health check: a mapping with `type` (http, tcp or exec) and its fields, e.g. \
                 `{type: http, port: 8080, path: /health}`"
)]
pub(super) struct RawCheck {
    #[serde(default, deserialize_with = "de_check_name")]
    pub(super) name: Option<String>,
    #[serde(default, rename = "type", deserialize_with = "de_check_type")]
    pub(super) kind: Option<CheckType>,
    #[serde(default, deserialize_with = "de_port")]
    pub(super) port: Option<u16>,
    #[serde(default, deserialize_with = "de_http_path")]
    pub(super) path: Option<String>,
    #[serde(default, deserialize_with = "de_status")]
    pub(super) expect_status: Option<u16>,
    #[serde(default, deserialize_with = "de_list")]
    pub(super) command: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    pub(super) interval: Option<u64>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    pub(super) timeout: Option<u64>,
    #[serde(default, deserialize_with = "de_threshold")]
    pub(super) healthy_threshold: Option<u32>,
    #[serde(default, deserialize_with = "de_threshold")]
    pub(super) unhealthy_threshold: Option<u32>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) grace: Option<u64>,
    #[serde(default, deserialize_with = "de_bool")]
    pub(super) restart: Option<bool>,
}

// ---------------------------------------------------------------------------------------------------------
// Field readers. Each checks its value while serde_norway still knows where the value is, so that the error
// carries its line and column.

/// Any scalar, read as its text, then checked. Scalars are read as written (see the module doc).
struct Scalar<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<'de, T> Visitor<'de> for Scalar<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

impl<'de, T> DeserializeSeed<'de> for Scalar<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_str(self)
    }
}

macro_rules! scalar_field {
    ($name:ident, $ty:ty, $expecting:expr, $parse:expr) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$ty>, D::Error> {
            d.deserialize_str(Scalar::<$ty> { expecting: $expecting, parse: $parse }).map(Some)
        }
    };
}

scalar_field!(de_job_name, String, "a job name such as `web`", |s| checked_name("job", s));
scalar_field!(de_namespace, String, "a namespace name such as `team-a`", |s| checked_name("namespace", s));
scalar_field!(de_scheduler, String, "a scheduler name such as `batch`", |s| checked_name("scheduler", s));
scalar_field!(de_image, String, "a container image such as `busybox`", image);
scalar_field!(de_label, String, "a node label name such as `zone`", label);
scalar_field!(de_text, String, "a string", label_value);
scalar_field!(de_kind, JobKind, "`batch` or `service`", kind);
scalar_field!(de_policy, RestartMode, "`never`, `on_failure` or `always`", policy);
scalar_field!(de_on_disconnect, OnDisconnect, "`stop` or `keep_running`", on_disconnect);
scalar_field!(de_cpu, u64, "a CPU quantity such as `500m` or `2`", cpu_request);
scalar_field!(de_memory, u64, "a memory quantity such as `512Mi`", memory_request);
scalar_field!(de_duration, u64, "a duration such as `2s` or `500ms`", parse_duration_ms);
scalar_field!(de_positive_duration, u64, "a duration such as `10s` or `500ms`", positive_duration);
scalar_field!(de_check_name, String, "a check name such as `ready`", |s| checked_name("check", s));
scalar_field!(de_check_type, CheckType, "`http`, `tcp` or `exec`", check_type);
scalar_field!(de_service_name, String, "a service name such as `web`", |s| checked_name("service", s));
scalar_field!(de_port_name, String, "a port name such as `http`", |s| checked_name("port", s));
scalar_field!(de_http_path, String, "an HTTP path such as `/health`", http_path);

fn checked_name(what: &str, s: &str) -> Result<String, String> {
    validate_name(what, s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

fn image(s: &str) -> Result<String, String> {
    if let Some(problem) = control(s, Allow::Nothing) {
        Err(format!("the image name {problem}"))
    } else if s.trim().is_empty() {
        Err("the image must not be empty; name a container image such as `busybox`".to_string())
    } else if s.chars().any(char::is_whitespace) {
        Err(format!("image {s:?} contains whitespace; put the command in `command` and `args`"))
    } else {
        Ok(s.to_string())
    }
}

fn label(s: &str) -> Result<String, String> {
    if let Some(problem) = control(s, Allow::Nothing) {
        Err(format!("the label name {problem}"))
    } else if s.trim().is_empty() {
        Err("a label name must not be empty; name a node label such as `zone`".to_string())
    } else {
        Ok(s.to_string())
    }
}

fn kind(s: &str) -> Result<JobKind, String> {
    match s {
        "batch" => Ok(JobKind::Batch),
        "service" => Ok(JobKind::Service),
        _ => {
            Err(format!("unknown kind `{s}`, expected `batch` (runs to completion) or `service` (runs until stopped)"))
        }
    }
}

fn policy(s: &str) -> Result<RestartMode, String> {
    match s {
        "never" => Ok(RestartMode::Never),
        "on_failure" => Ok(RestartMode::OnFailure),
        "always" => Ok(RestartMode::Always),
        _ => Err(format!("unknown restart policy `{s}`, expected `never`, `on_failure` or `always`")),
    }
}

fn on_disconnect(s: &str) -> Result<OnDisconnect, String> {
    match s {
        "stop" => Ok(OnDisconnect::Stop),
        "keep_running" => Ok(OnDisconnect::KeepRunning),
        _ => Err(format!(
            "unknown `{s}`, expected `stop` (the default: stopped before the node's lease can expire) or \
             `keep_running` (runs on through a disconnect; a replacement may overlap it)"
        )),
    }
}

fn check_type(s: &str) -> Result<CheckType, String> {
    match s {
        "http" => Ok(CheckType::Http),
        "tcp" => Ok(CheckType::Tcp),
        "exec" => Ok(CheckType::Exec),
        _ => Err(format!(
            "unknown check type `{s}`, expected `http` (a GET answered 2xx/3xx), `tcp` (a connection accepted) or \
             `exec` (a command in the task's container exits 0)"
        )),
    }
}

/// The path of an HTTP check: it goes into the request line as written, so it must be one word.
fn http_path(s: &str) -> Result<String, String> {
    if let Some(problem) = control(s, Allow::Nothing) {
        Err(format!("the path {problem}"))
    } else if !s.starts_with('/') {
        Err(format!("path {} must start with `/`, e.g. `/health`", shown(s)))
    } else if s.chars().any(char::is_whitespace) {
        Err(format!("path {} contains whitespace; percent-encode it (`%20`)", shown(s)))
    } else {
        Ok(s.to_string())
    }
}

/// An interval or timeout: a probe every 0 ms, or one that must answer in 0 ms, is a mistake.
fn positive_duration(s: &str) -> Result<u64, String> {
    match parse_duration_ms(s)? {
        0 => Err("must be more than 0, e.g. `10s` or `500ms`".to_string()),
        ms => Ok(ms),
    }
}

fn cpu_request(s: &str) -> Result<u64, String> {
    match parse_cpu(s)? {
        0 => Err("CPU must be more than 0; write millicores (`100m`) or cores (`0.5`, `2`)".to_string()),
        millis => Ok(millis),
    }
}

fn memory_request(s: &str) -> Result<u64, String> {
    match parse_memory(s)? {
        0 => Err("memory must be more than 0; write e.g. `512Mi` or `1Gi`".to_string()),
        bytes => Ok(bytes),
    }
}

/// A whole number in a range. Reads any scalar, so that a quoted `"3"` works and a wrong value gets our words.
struct Int {
    expecting: &'static str,
    min: i64,
    max: i64,
}

impl Int {
    fn check<E: de::Error>(&self, v: i128) -> Result<i64, E> {
        if v < i128::from(self.min) || v > i128::from(self.max) {
            Err(E::custom(format!("{v} is out of range; expected {}", self.expecting)))
        } else {
            Ok(v as i64)
        }
    }
}

impl<'de> Visitor<'de> for Int {
    type Value = i64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
        self.check(i128::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
        self.check(i128::from(v))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<i64, E> {
        self.check(v)
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<i64, E> {
        self.check(i128::try_from(v).unwrap_or(i128::MAX))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
        Err(E::custom(format!("{v} is not a whole number; expected {}", self.expecting)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<i64, E> {
        match v.trim().parse::<i128>() {
            Ok(n) => self.check(n),
            Err(_) => Err(E::custom(format!("`{v}` is not a whole number; expected {}", self.expecting))),
        }
    }
}

fn de_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    const EXPECTING: &str = "a number of tasks from 1 to 100000";
    const _: () = assert!(MAX_TASKS == 100_000, "update EXPECTING");
    let n = d.deserialize_any(Int { expecting: EXPECTING, min: 1, max: i64::from(MAX_TASKS) })?;
    Ok(Some(n as u32))
}

fn de_priority<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    const EXPECTING: &str = "a priority from -2147483648 to 2147483647";
    let n = d.deserialize_any(Int { expecting: EXPECTING, min: i32::MIN.into(), max: i32::MAX.into() })?;
    Ok(Some(n as i32))
}

fn de_max_restarts<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    const EXPECTING: &str = "a number of restarts from 0 to 4294967295";
    let n = d.deserialize_any(Int { expecting: EXPECTING, min: 0, max: u32::MAX.into() })?;
    Ok(Some(n as u32))
}

fn de_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    const EXPECTING: &str = "a port from 1 to 65535";
    let n = d.deserialize_any(Int { expecting: EXPECTING, min: 1, max: u16::MAX.into() })?;
    Ok(Some(n as u16))
}

fn de_status<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    const EXPECTING: &str = "an HTTP status from 100 to 599";
    let n = d.deserialize_any(Int { expecting: EXPECTING, min: 100, max: 599 })?;
    Ok(Some(n as u16))
}

fn de_threshold<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    const EXPECTING: &str = "a number of consecutive probes from 1 to 1000";
    let n = d.deserialize_any(Int { expecting: EXPECTING, min: 1, max: 1000 })?;
    Ok(Some(n as u32))
}

struct Bool;

impl<'de> Visitor<'de> for Bool {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`true` or `false`")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }
}

fn de_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    d.deserialize_bool(Bool).map(Some)
}

/// A list of scalars, each read as written.
struct List {
    expecting: &'static str,
    /// Label values (a node label's value: one line of text), not command-line arguments.
    values: bool,
}

impl<'de> Visitor<'de> for List {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut out = Vec::new();
        let parse: fn(&str) -> Result<String, String> = if self.values { label_value } else { argument };
        while let Some(item) = seq.next_element_seed(Scalar { expecting: "a string", parse })? {
            out.push(item);
        }
        if self.values && out.is_empty() {
            return Err(de::Error::custom("the list is empty; give at least one value, e.g. `[a, b]`"));
        }
        Ok(out)
    }
}

fn de_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    d.deserialize_seq(List { expecting: "a list of strings, e.g. `[\"sh\", \"-c\"]`", values: false }).map(Some)
}

fn de_values<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    d.deserialize_seq(List { expecting: "a list of label values, e.g. `[a, b]`", values: true }).map(Some)
}

struct Constraints;

impl<'de> Visitor<'de> for Constraints {
    type Value = Vec<RawConstraint>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of constraints, e.g. `[{label: zone, equals: a}]`")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<RawConstraint>, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element()? {
            out.push(item);
        }
        Ok(out)
    }
}

fn de_constraints<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<RawConstraint>>, D::Error> {
    d.deserialize_seq(Constraints).map(Some)
}

struct Checks;

impl<'de> Visitor<'de> for Checks {
    type Value = Vec<RawCheck>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of health checks, e.g. `[{type: tcp, port: 8080}]` (one check may be given as `check:`)")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<RawCheck>, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element()? {
            out.push(item);
        }
        Ok(out)
    }
}

fn de_checks<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<RawCheck>>, D::Error> {
    d.deserialize_seq(Checks).map(Some)
}

struct Services;

impl<'de> Visitor<'de> for Services {
    type Value = Vec<RawService>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of services, e.g. `[{name: web, port: http}]`")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<RawService>, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element()? {
            out.push(item);
        }
        Ok(out)
    }
}

fn de_services<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<RawService>>, D::Error> {
    d.deserialize_seq(Services).map(Some)
}

/// A service's tags: words a client selects on, each one line of printable text without whitespace.
struct Tags;

impl<'de> Visitor<'de> for Tags {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of tags, e.g. `[primary, v2]`")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element_seed(Scalar { expecting: "a tag such as `primary`", parse: tag })? {
            out.push(item);
        }
        Ok(out)
    }
}

fn de_tags<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    d.deserialize_seq(Tags).map(Some)
}

fn tag(s: &str) -> Result<String, String> {
    if let Some(problem) = control(s, Allow::Nothing) {
        Err(format!("the tag {problem}"))
    } else if s.is_empty() || s.chars().any(char::is_whitespace) {
        Err(format!("tag {} must be one word, not empty", shown(s)))
    } else {
        Ok(s.to_string())
    }
}

/// The `ports` mapping, read by hand like `env` so that a bad or repeated name is reported at the name.
struct Ports;

impl<'de> Visitor<'de> for Ports {
    type Value = BTreeMap<String, u16>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of port names to port numbers, e.g. `{http: 8080}`")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut ports = BTreeMap::new();
        while let Some(name) = map.next_key_seed(PortName(&ports))? {
            let port = map.next_value_seed(PortNumber)?;
            ports.insert(name, port);
        }
        Ok(ports)
    }
}

struct PortName<'a>(&'a BTreeMap<String, u16>);

impl<'de> DeserializeSeed<'de> for PortName<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for PortName<'_> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port name such as `http`")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        let name = checked_name("port", v).map_err(E::custom)?;
        if self.0.contains_key(v) {
            return Err(E::custom(format!("port `{v}` is named twice; each name may appear once")));
        }
        Ok(name)
    }
}

struct PortNumber;

impl<'de> DeserializeSeed<'de> for PortNumber {
    type Value = u16;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u16, D::Error> {
        de_port(d).map(|p| p.unwrap_or(0))
    }
}

fn de_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, u16>>, D::Error> {
    d.deserialize_map(Ports).map(Some)
}

/// The `env` mapping. Read by hand so that a bad or repeated name is reported at the name itself (YAML forbids
/// repeated keys, but a plain map would silently keep the last).
struct Env;

impl<'de> Visitor<'de> for Env {
    type Value = BTreeMap<String, String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of variable names to values, e.g. `{GREETING: hello}`")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut env = BTreeMap::new();
        while let Some(name) = map.next_key_seed(EnvName(&env))? {
            let value = map.next_value_seed(Scalar { expecting: "a string, number or boolean", parse: env_value })?;
            env.insert(name, value);
        }
        Ok(env)
    }
}

struct EnvName<'a>(&'a BTreeMap<String, String>);

impl<'de> DeserializeSeed<'de> for EnvName<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for EnvName<'_> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a variable name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        if v.is_empty() {
            Err(E::custom("a variable name must not be empty"))
        } else if let Some(problem) = control(v, Allow::Nothing) {
            Err(E::custom(format!("variable name {problem}")))
        } else if v.chars().any(char::is_whitespace) {
            Err(E::custom(format!("variable name {} contains whitespace, which no variable name may", shown(v))))
        } else if v.contains('=') {
            Err(E::custom(format!("variable name `{v}` contains `=`, which no variable name may")))
        } else if self.0.contains_key(v) {
            Err(E::custom(format!("variable `{v}` is set twice; each may appear once")))
        } else {
            Ok(v.to_string())
        }
    }
}

fn de_env<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    d.deserialize_map(Env).map(Some)
}

/// Which control characters a text may hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Allow {
    /// Names, images, labels: none (they are one word of printable text).
    Nothing,
    /// Values and arguments: tab, newline and carriage return (scripts and multi-line values are real).
    LineBreaks,
}

/// What is wrong with a text's control characters, as the end of a sentence naming the text; `None` if fine.
///
/// NUL is refused everywhere: an argument or an environment variable reaches the process as a C string, so
/// anything after a NUL would be silently cut off.
fn control(s: &str, allow: Allow) -> Option<String> {
    let (at, c) = s
        .chars()
        .enumerate()
        .find(|&(_, c)| c.is_control() && !(allow == Allow::LineBreaks && matches!(c, '\t' | '\n' | '\r')))?;
    let at = at + 1;
    let allowed = match allow {
        Allow::Nothing => "no control character is allowed here",
        Allow::LineBreaks => "tab, newline and carriage return are the only control characters allowed here",
    };
    Some(match c {
        '\0' => format!(
            "{} contains NUL (U+0000) at character {at}, which no process can receive (it would cut the text off \
             there); {allowed}",
            shown(s)
        ),
        _ => format!("{} contains the control character U+{:04X} at character {at}; {allowed}", shown(s), c as u32),
    })
}

/// A text as it appears in a message: quoted and escaped, and shortened if long.
fn shown(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        return format!("{s:?}");
    }
    let head: String = s.chars().take(MAX).collect();
    format!("{head:?}... ({} characters)", s.chars().count())
}

/// A label value (in a constraint): one line of printable text, as node labels are.
fn label_value(s: &str) -> Result<String, String> {
    match control(s, Allow::Nothing) {
        Some(problem) => Err(format!("the label value {problem}")),
        None => Ok(s.to_string()),
    }
}

/// A command or argument: any text a process can receive.
fn argument(s: &str) -> Result<String, String> {
    match control(s, Allow::LineBreaks) {
        Some(problem) => Err(format!("the argument {problem}")),
        None => Ok(s.to_string()),
    }
}

/// An environment variable's value: any text a process can receive.
fn env_value(s: &str) -> Result<String, String> {
    match control(s, Allow::LineBreaks) {
        Some(problem) => Err(format!("the value {problem}")),
        None => Ok(s.to_string()),
    }
}
