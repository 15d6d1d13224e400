//! A bounded adversarial run in CI: several hundred malformed or hostile requests across every
//! endpoint (broken JSON, NaN/Infinity literals, invalid UTF-8, deep nesting, 10 MB bodies, huge
//! `n`/`max_tokens`/stop lists, layer ranges in model names, bad names and roles, wrong methods),
//! each answered with a 4xx OpenAI error JSON within its time bound; afterwards the server answers
//! a known greedy request identically and its memory is back near idle.

mod common;

use std::time::{Duration, Instant};

use common::server::{rss_bytes, ServerProc};
use serde_json::{json, Value};

struct Case {
    method: &'static str,
    path: String,
    body: Vec<u8>,
    what: String,
}

fn case(
    method: &'static str,
    path: &str,
    body: impl Into<Vec<u8>>,
    what: impl Into<String>,
) -> Case {
    Case {
        method,
        path: path.to_string(),
        body: body.into(),
        what: what.into(),
    }
}

/// Bodies that are not a request of any endpoint.
fn broken_bodies() -> Vec<(Vec<u8>, &'static str)> {
    let mut v: Vec<(Vec<u8>, &'static str)> = [
        ("", "empty"),
        ("{", "unclosed"),
        ("[]", "array"),
        ("null", "null"),
        ("123", "number"),
        ("\"text\"", "string"),
        ("{\"model\":", "truncated"),
        ("{not json}", "bare words"),
        ("{\"model\": NaN}", "NaN literal"),
        ("{\"model\": Infinity}", "Infinity literal"),
        ("{\"model\": -Infinity}", "-Infinity literal"),
        ("{\"model\": \"m\"} trailing", "trailing garbage"),
        ("\u{feff}{}", "byte order mark"),
        ("{\"x\": 1e999}", "number out of range"),
        ("{\"model\": \"\\ud800\"}", "lone surrogate"),
        (
            "{\"model\": \"a\", \"model\": \"b\"",
            "duplicate key, unclosed",
        ),
    ]
    .into_iter()
    .map(|(b, w)| (b.as_bytes().to_vec(), w))
    .collect();
    v.push((b"{\"model\": \"\xff\xfe\"}".to_vec(), "invalid UTF-8"));
    v.push(("[".repeat(100_000).into_bytes(), "deep nesting"));
    v
}

/// Values of `model` that name nothing servable.
fn bad_models() -> Vec<Value> {
    let mut v: Vec<Value> = [
        "",
        "gpt-4",
        "smollm2-135m@drop=0-1000000000000",
        "smollm2-135m@drop=0-18446744073709551615",
        "smollm2-135m@keep=0-300000000",
        "smollm2-135m@drop=18446744073709551616",
        "smollm2-135m@",
        "smollm2-135m@drop=",
        "smollm2-135m@drop=a",
        "smollm2-135m@drop=5-3",
        "smollm2-135m@foo=3",
        "smollm2-135m@drop=0-29",
        "smollm2-135m@drop=3@drop=4",
        "smollm2-135m@drop=3,3",
        "smollm2-135m@keep=",
        "rev25@drop=29",
        "@drop=3",
        "../smollm2-135m",
        "smollm2-135m/rev25/x",
    ]
    .into_iter()
    .map(Value::from)
    .collect();
    v.push(json!("x".repeat(2000)));
    v.push(json!(format!("smollm2-135m@drop={}", "0,".repeat(3000))));
    v.push(json!(5));
    v.push(json!(null));
    v.push(json!(["smollm2-135m"]));
    v
}

fn with(base: &Value, key: &str, value: Value) -> Vec<u8> {
    let mut b = base.clone();
    b[key] = value;
    b.to_string().into_bytes()
}

fn completion_cases(ten_mb: &str) -> Vec<Case> {
    let base = json!({"model": "smollm2-135m", "prompt": [1, 2, 3], "max_tokens": 4});
    let p = "/v1/completions";
    let mut out = Vec::new();
    let fields: Vec<(&str, Value)> = vec![
        ("prompt", json!({})),
        ("prompt", json!(true)),
        ("prompt", json!([[["a"]]])),
        ("prompt", json!([-1])),
        ("prompt", json!([1.5])),
        ("prompt", json!([4294967296u64])),
        ("prompt", json!([49152])),
        ("prompt", json!(vec![99_999_999u32; 10_000])),
        ("prompt", json!([])),
        ("prompt", json!([[], []])),
        ("prompt", json!("")),
        ("prompt", json!(ten_mb)),
        ("prompt", json!(vec![1u32; 9000])),
        ("prompt", json!(null)),
        ("max_tokens", json!(-1)),
        ("max_tokens", json!(1e30)),
        ("max_tokens", json!("10")),
        ("max_tokens", json!(u64::MAX)),
        ("max_tokens", json!(9000)),
        ("max_tokens", json!(0)),
        ("n", json!(0)),
        ("n", json!(129)),
        ("n", json!(1e9)),
        ("n", json!(-1)),
        ("n", json!(u64::MAX)),
        ("logprobs", json!(21)),
        ("logprobs", json!(1_000_000_000)),
        ("logprobs", json!(-1)),
        ("logprobs", json!(true)),
        ("temperature", json!("hot")),
        ("temperature", json!(-1)),
        ("top_p", json!(0)),
        ("top_p", json!(2)),
        ("top_p", json!(-0.1)),
        ("top_k", json!(-5)),
        ("top_k", json!(1.5)),
        ("min_p", json!(2)),
        ("repetition_penalty", json!(0)),
        ("repetition_penalty", json!(-1)),
        ("frequency_penalty", json!(3)),
        ("presence_penalty", json!(-3)),
        ("seed", json!(-1)),
        ("seed", json!(1.5)),
        ("stop", json!([""])),
        ("stop", json!(vec!["x"; 17])),
        ("stop", json!("y".repeat(300))),
        ("stop", json!(vec!["z"; 10_000])),
        ("stop", json!([["nested"]])),
        ("stop", json!(5)),
        ("stop_token_ids", json!([99_999_999])),
        ("stop_token_ids", json!(vec![1u32; 5000])),
        ("stop_token_ids", json!([-1])),
        ("stream", json!("yes")),
        ("stream_options", json!(5)),
        ("echo", json!("x")),
        ("ignore_eos", json!(1)),
    ];
    for (k, v) in fields {
        let what = format!("completions {k}={}", short(&v));
        out.push(case("POST", p, with(&base, k, v), what));
    }
    let mut three = base.clone();
    three["prompt"] = json!([[1, 2], [3, 4], [5, 6]]);
    out.push(case(
        "POST",
        p,
        with(&three, "n", json!(100)),
        "prompts x n over the limit",
    ));
    out
}

fn chat_cases(ten_mb: &str) -> Vec<Case> {
    let base = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let p = "/v1/chat/completions";
    let mut out = Vec::new();
    let msg = |role: Value, content: Value| json!([{"role": role, "content": content}]);
    let fields: Vec<(&str, Value)> = vec![
        ("messages", json!([])),
        ("messages", json!(null)),
        ("messages", json!("hi")),
        ("messages", json!([{}])),
        ("messages", msg(json!(5), json!("hi"))),
        ("messages", msg(json!(""), json!("hi"))),
        ("messages", msg(json!("robot"), json!("hi"))),
        ("messages", msg(json!("tool"), json!("hi"))),
        (
            "messages",
            msg(json!("user"), json!([{"type": "image_url"}])),
        ),
        ("messages", msg(json!("user"), json!([{"type": "text"}]))),
        ("messages", msg(json!("user"), json!({}))),
        ("messages", msg(json!("user"), json!(5))),
        ("messages", msg(json!("user"), json!(ten_mb))),
        ("messages", msg(json!("user"), json!("word ".repeat(9000)))),
        ("max_tokens", json!(0)),
        ("max_tokens", json!(-1)),
        ("max_tokens", json!(1_000_000_000_000u64)),
        ("max_completion_tokens", json!(0)),
        ("top_logprobs", json!(5)),
        ("logprobs", json!("yes")),
        ("n", json!(0)),
        ("n", json!(200)),
        ("add_generation_prompt", json!("x")),
        ("temperature", json!([1])),
        ("stop", json!(vec!["s"; 100])),
    ];
    for (k, v) in fields {
        let what = format!("chat {k}={}", short(&v));
        out.push(case("POST", p, with(&base, k, v), what));
    }
    let mut lp = base.clone();
    lp["logprobs"] = json!(true);
    out.push(case(
        "POST",
        p,
        with(&lp, "top_logprobs", json!(21)),
        "top_logprobs 21",
    ));
    out
}

fn tokenizer_cases(ten_mb: &str) -> Vec<Case> {
    let mut out = vec![
        case(
            "POST",
            "/tokenize",
            json!({}).to_string(),
            "tokenize neither",
        ),
        case(
            "POST",
            "/tokenize",
            json!({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}).to_string(),
            "tokenize both",
        ),
        case(
            "POST",
            "/tokenize",
            json!({"prompt": 5}).to_string(),
            "tokenize number",
        ),
        case(
            "POST",
            "/tokenize",
            json!({"messages": [{"role": "nobody", "content": "a"}]}).to_string(),
            "tokenize bad role",
        ),
        case(
            "POST",
            "/tokenize",
            json!({"prompt": ten_mb}).to_string(),
            "tokenize 10 MB",
        ),
        case(
            "POST",
            "/tokenize",
            json!({"prompt": "a", "add_special_tokens": "x"}).to_string(),
            "tokenize flag type",
        ),
        case(
            "POST",
            "/detokenize",
            json!({"tokens": [-1]}).to_string(),
            "detok negative",
        ),
        case(
            "POST",
            "/detokenize",
            json!({"tokens": [99_999_999]}).to_string(),
            "detok out of range",
        ),
        case(
            "POST",
            "/detokenize",
            json!({"tokens": "abc"}).to_string(),
            "detok string",
        ),
        case(
            "POST",
            "/detokenize",
            json!({"tokens": vec![1u32; 10_000]}).to_string(),
            "detok over max_model_len",
        ),
        case(
            "POST",
            "/detokenize",
            json!({}).to_string(),
            "detok missing",
        ),
    ];
    for path in ["/tokenize", "/detokenize"] {
        for m in bad_models() {
            let body = if path == "/tokenize" {
                json!({"model": m, "prompt": "hi"})
            } else {
                json!({"model": m, "tokens": [1, 2]})
            };
            if m.is_null() {
                continue; // a null model means the default base there: a valid request
            }
            out.push(case(
                "POST",
                path,
                body.to_string(),
                format!("{path} model {}", short(&m)),
            ));
        }
    }
    for q in ["?model=gpt-4", "?model=smollm2-135m@drop=0-99999999999"] {
        out.push(case(
            "GET",
            &format!("/tokenizer_info{q}"),
            "",
            format!("info {q}"),
        ));
    }
    out.push(case(
        "GET",
        &format!("/tokenizer_info?model={}", "x".repeat(2000)),
        "",
        "info long model",
    ));
    out
}

fn variant_cases() -> Vec<Case> {
    let v = |body: Value, what: &str| case("POST", "/v1/variants", body.to_string(), what);
    let mut out = vec![
        v(json!({"base": "smollm2-135m", "drop": "3"}), "no name"),
        v(
            json!({"base": "smollm2-135m", "name": "a", "drop": "3", "keep": "1"}),
            "drop and keep",
        ),
        v(json!({"base": "smollm2-135m", "name": "a"}), "no plan"),
        v(
            json!({"base": "smollm2-135m", "name": "a", "reverse": 1.5}),
            "reverse 1.5",
        ),
        v(
            json!({"base": "smollm2-135m", "name": "a", "reverse": -0.1}),
            "reverse negative",
        ),
        v(
            json!({"base": "smollm2-135m", "name": "a", "drop": "0-1000000000000"}),
            "huge drop",
        ),
        v(
            json!({"base": "smollm2-135m", "name": "a", "drop": [99]}),
            "drop 99",
        ),
        v(
            json!({"base": "smollm2-135m", "name": "a", "keep": []}),
            "keep nothing",
        ),
        v(
            json!({"base": "smollm2-135m", "name": "a", "drop": "0-29"}),
            "drop all",
        ),
        v(
            json!({"base": "nobody", "name": "a", "drop": "3"}),
            "unknown base",
        ),
        v(
            json!({"base": "smollm2-135m", "name": "a", "drop": "3", "x": 1}),
            "unknown field",
        ),
        v(
            json!({"base": "smollm2-135m", "name": "rev25", "drop": "3"}),
            "exists",
        ),
        v(
            json!({"base": "smollm2-135m", "name": "smollm2-135m", "drop": "3"}),
            "base name",
        ),
        v(
            json!({"base": "smollm2-135m", "name": "a", "drop": vec![0u64; 100_000]}),
            "long list",
        ),
    ];
    for name in [".", "..", "a/b", "", "a b", "a@b", "é", "\u{0}"] {
        out.push(v(
            json!({"base": "smollm2-135m", "name": name, "drop": "3"}),
            "bad name",
        ));
    }
    out.push(v(
        json!({"base": "smollm2-135m", "name": "x".repeat(20_000), "drop": "3"}),
        "name 20000",
    ));
    for name in ["smollm2-135m", "nothing", "%2e%2e", "rev25%2Fx"] {
        out.push(case(
            "DELETE",
            &format!("/v1/variants/{name}"),
            "",
            format!("delete {name}"),
        ));
    }
    out
}

fn route_cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (m, p) in [
        ("GET", "/v1/completions"),
        ("GET", "/v1/chat/completions"),
        ("PUT", "/v1/models"),
        ("DELETE", "/tokenize"),
        ("GET", "/detokenize"),
        ("POST", "/tokenizer_info"),
        ("POST", "/health"),
        ("POST", "/metrics"),
        ("PATCH", "/v1/variants"),
    ] {
        out.push(case(m, p, "", format!("{m} {p}")));
    }
    for p in [
        "/v1/nothing",
        "/v2/models",
        "/..%2f..%2fetc/passwd",
        "/v1/models/x/y",
    ] {
        out.push(case("GET", p, "", format!("GET {p}")));
    }
    out
}

fn short(v: &Value) -> String {
    v.to_string().chars().take(40).collect()
}

fn all_cases() -> Vec<Case> {
    let ten_mb = "ab ".repeat(10 << 20 >> 2);
    let mut cases = Vec::new();
    for path in [
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/detokenize",
        "/v1/variants",
    ] {
        for (body, what) in broken_bodies() {
            cases.push(case("POST", path, body, format!("{path}: {what}")));
        }
    }
    for path in ["/v1/completions", "/v1/chat/completions"] {
        for m in bad_models() {
            let body = if path == "/v1/completions" {
                json!({"model": m, "prompt": [1, 2], "max_tokens": 2})
            } else {
                json!({"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            };
            cases.push(case(
                "POST",
                path,
                body.to_string(),
                format!("{path} model {}", short(&m)),
            ));
        }
    }
    cases.extend(completion_cases(&ten_mb));
    cases.extend(chat_cases(&ten_mb));
    cases.extend(tokenizer_cases(&ten_mb));
    cases.extend(variant_cases());
    cases.extend(route_cases());
    cases
}

fn greedy(s: &ServerProc) -> Value {
    let body = json!({"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 12,
                      "temperature": 0, "logprobs": 2});
    let (status, r) = s.post("/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{r}");
    r["choices"][0].clone()
}

#[test]
fn hundreds_of_hostile_requests_get_4xx_json_and_change_nothing() {
    let s = ServerProc::start_default(&["--max-in-flight", "256"]);
    let before = greedy(&s);
    std::thread::sleep(Duration::from_millis(300));
    let idle = rss_bytes(s.pid());
    let cases = all_cases();
    assert!(cases.len() >= 300, "{} cases", cases.len());
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let started = Instant::now();
    let mut peak = idle;
    let mut slowest = (Duration::ZERO, String::new());
    for c in &cases {
        let t = Instant::now();
        let r = client
            .request(c.method.parse().unwrap(), s.url(&c.path))
            .header("content-type", "application/json")
            .body(c.body.clone())
            .send()
            .unwrap_or_else(|e| panic!("{}: {e}", c.what));
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        let took = t.elapsed();
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{}: {status} not JSON: {text:.200}", c.what));
        assert!(
            (400..500).contains(&status),
            "{}: {status} {text:.300}",
            c.what
        );
        let e = &v["error"];
        assert!(e["message"].is_string(), "{}: {text:.300}", c.what);
        assert!(
            e["type"].is_string() && e["code"] == status,
            "{}: {text:.300}",
            c.what
        );
        assert!(took < Duration::from_secs(5), "{} took {took:?}", c.what);
        if took > slowest.0 {
            slowest = (took, c.what.clone());
        }
        peak = peak.max(rss_bytes(s.pid()));
    }
    let total = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_bytes(s.pid());
    println!(
        "{} hostile requests in {total:?}; slowest {:?} ({}); RSS idle {} MB, peak {} MB, after {} MB",
        cases.len(),
        slowest.0,
        slowest.1,
        idle >> 20,
        peak >> 20,
        after >> 20
    );
    assert_eq!(greedy(&s), before, "the known request answers as before");
    assert!(
        (after as f64) < idle as f64 * 1.2,
        "RSS {} MB after, {} MB idle",
        after >> 20,
        idle >> 20
    );
    assert!(peak < idle + (1 << 30), "peak RSS {} MB", peak >> 20);
    let health = reqwest::blocking::get(s.url("/health")).unwrap();
    assert_eq!(health.status().as_u16(), 200);
}
