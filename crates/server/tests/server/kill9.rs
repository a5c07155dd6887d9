//! Kill -9 of a writing server, over and over, on one SSD directory: every
//! restart succeeds, leaves no temporary file once it is up, and every
//! answer equals the answer of a server that never had a tier (no corrupt
//! or torn block is ever served). CI: 50 kills; `STRATA_KILL9_RUNS=1000`
//! for the long run. Also: a second server on the default SSD directory
//! warns and runs without the tier.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use strata_testkit::tiny_model::{self, TinyConfig};

struct Proc {
    child: Child,
    base: String,
    /// Every line it logged so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    /// Whether it logs a line holding `what` within a few seconds.
    fn logs(&self, what: &str) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if self.log.lock().unwrap().iter().any(|l| l.contains(what)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

/// Where a started server keeps its SSD tier.
#[derive(Clone, Copy)]
enum Ssd<'a> {
    Off,
    Dir(&'a Path),
    /// The default directory, `<cache>/kv`.
    Default,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `strata serve` on the tiny model and waits until it answers.
fn start(cache: &Path, ssd: Ssd<'_>) -> Proc {
    // Wide enough that a block is 64 KiB and a record takes a while to
    // write (a kill often lands inside one).
    let model = tiny_model::path(TinyConfig {
        layers: 8,
        hidden: 256,
        heads: 4,
        kv_heads: 4,
        ffn: 256,
        ..TinyConfig::default()
    });
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.args([
        "serve",
        "--port",
        "0",
        "--threads",
        "1",
        "--kv-blocks",
        "48",
    ])
    .args([
        "--block-size",
        "4",
        "--served-model-name",
        "tiny",
        "--model",
    ])
    .arg(&model)
    // Its own cache directory: the hash key lives there.
    .env("STRATA_CACHE_DIR", cache)
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    match ssd {
        // Synced writes: a record takes long enough to be killed mid-write.
        Ssd::Dir(dir) => {
            cmd.arg("--ssd-cache-dir")
                .arg(dir)
                .args(["--ssd-cache-size", "16MiB", "--ssd-sync"])
        }
        Ssd::Off => cmd.args(["--ssd-cache-size", "0"]),
        Ssd::Default => cmd.args(["--ssd-cache-size", "16MiB"]),
    };
    let mut child = cmd.spawn().expect("the strata binary runs");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line.clone());
            if line.contains("listening")
                && let Some(at) = line.find("http://")
            {
                let addr: String = line[at..]
                    .chars()
                    .take_while(|c| !c.is_whitespace() && !c.is_control())
                    .collect();
                let _ = tx.send(addr);
            }
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server says where it listens");
    let p = Proc { child, base, log };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if let Ok(r) = ureq::get(format!("{}/health", p.base)).call()
            && r.status() == 200
        {
            return p;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the server never became ready");
}

fn prompt(k: usize) -> String {
    let head = "a system prompt that every conversation shares, long enough for blocks";
    format!("{head} and then question number {k} with its own words")
}

fn complete(base: &str, k: usize) -> Option<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let body = json!({"model": "tiny", "prompt": prompt(k), "max_tokens": 6, "temperature": 0});
    let mut r = agent
        .post(format!("{base}/v1/completions"))
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .ok()?;
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
    Some(v["choices"][0]["text"].as_str()?.to_string())
}

fn temporary_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("records"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_none_or(|x| x != "rec"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kill_9_while_writing_never_serves_a_bad_block_and_every_restart_recovers() {
    let runs: usize = std::env::var("STRATA_KILL9_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let root = std::env::temp_dir().join(format!("strata-kill9-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (cache, ssd) = (root.join("cache"), root.join("ssd"));
    const PROMPTS: usize = 6;
    // The reference: a server with no tier at all.
    let want: Vec<String> = {
        let p = start(&cache, Ssd::Off);
        (0..PROMPTS)
            .map(|k| complete(&p.base, k).unwrap())
            .collect()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut restored_runs = 0;
    let (mut cut_short, mut left_temporary) = (0, 0);
    for run in 0..runs {
        let p = start(&cache, Ssd::Dir(&ssd));
        // Up, and recovered: nothing temporary is left from the last kill.
        let tmp = temporary_files(&ssd);
        assert!(
            tmp.is_empty(),
            "run {run}: temporary files survived recovery: {tmp:?}"
        );
        // The first answer comes from whatever the last run left on disk.
        let k = rng.random_range(0..PROMPTS);
        assert_eq!(
            complete(&p.base, k).as_deref(),
            Some(want[k].as_str()),
            "run {run}"
        );
        restored_runs += 1;
        // Then a flood of writes, killed at a random moment.
        let base = p.base.clone();
        let seed: u64 = rng.random();
        let flood = std::thread::spawn(move || {
            let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut answers = Vec::new();
            for _ in 0..40 {
                let k = r.random_range(0..PROMPTS);
                match complete(&base, k) {
                    Some(a) => answers.push((k, a)),
                    None => break,
                }
            }
            answers
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(0..120)));
        let mut p = p;
        let _ = p.child.kill();
        let _ = p.child.wait();
        let answers = flood.join().unwrap();
        cut_short += (answers.len() < 40) as usize;
        left_temporary += !temporary_files(&ssd).is_empty() as usize;
        for (k, a) in answers {
            assert_eq!(a, want[k], "run {run}: an answer before the kill differs");
        }
    }
    assert_eq!(restored_runs, runs);
    eprintln!(
        "kill -9: {runs} runs, {cut_short} killed mid-flood, {left_temporary} left temporary files for recovery"
    );
    assert!(
        cut_short * 2 > runs,
        "most kills land while the server writes"
    );
    // The last kill's leftovers go at the next start, too.
    let p = start(&cache, Ssd::Dir(&ssd));
    assert!(temporary_files(&ssd).is_empty());
    for (k, w) in want.iter().enumerate() {
        assert_eq!(complete(&p.base, k).as_deref(), Some(w.as_str()));
    }
    drop(p);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_second_server_on_the_default_ssd_directory_warns_and_runs_without_it() {
    let root = strata_testkit::TempDir::new("default-ssd");
    let cache = root.0.join("cache");
    let first = start(&cache, Ssd::Default);
    assert!(first.logs("SSD tier on"));
    assert!(
        cache.join("kv").join("records").is_dir(),
        "the default directory is <cache>/kv"
    );
    let second = start(&cache, Ssd::Default);
    assert!(
        second.logs("running without an SSD tier"),
        "{:?}",
        second.log.lock().unwrap()
    );
    // Both serve, the same answer.
    let (a, b) = (complete(&first.base, 0), complete(&second.base, 0));
    assert!(a.is_some() && a == b);
}
