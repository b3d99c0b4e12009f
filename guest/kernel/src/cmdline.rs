//! The guest command line (`/chosen/bootargs`).
//!
//! Space-separated `key=value` words:
//!
//! | key     | values                 | default | meaning                                   |
//! |---------|------------------------|---------|-------------------------------------------|
//! | `mode`  | `demo`, `test`, `reclaim`, `hostile`, `fuzz` | `demo`  | what the kernel does after boot |
//! | `touch` | a size (`64M`, `4096`) | `0`     | demo: bytes of fresh RAM to touch         |
//! | `fault` | `outside`, `abortloop` | none    | demo: access an IPA outside RAM/devices; or loop on aborts the guest cannot handle |
//! | `log`   | `info`, `debug`, `trace` | `info` | log verbosity                           |
//! | `stress_ms` | milliseconds, `1..=3600000` | `300` | test: how long the `stress` test runs |
//! | `pages` | `64..=262144` | `4096` | reclaim: pages in the pageable arena |
//! | `accesses` | `1..` | `200000` | reclaim: accesses per workload run (the populating pass included) |
//! | `seed` | a number | `1` | reclaim, fuzz: seed of the workload traces and of the fuzzer |
//! | `fuzz_calls` | `1..=1000000000` | `20000` | hostile, fuzz: hypercalls the fuzzer issues (all vCPUs together) |
//! | `target_pct` | `1..=100` | `40` | reclaim: memory target, % of the arena resident |
//! | `workloads` | comma list of `idle,hotcold,phase,scan` | all | reclaim: workloads to run |
//! | `policies` | comma list of `mglru,fifo,clock-perpage` | all | reclaim: policies to run each workload with |
//!
//! Sizes are decimal or `0x` hexadecimal with an optional binary suffix
//! `K`, `M` or `G` (case-insensitive). Unknown keys (and words without
//! `=`) are collected in [`Cmdline::unknown`] so the caller can warn about
//! them by name; a known key with a bad value is an error.
//!
//! This module is portable: it is compiled and unit-tested on the host
//! (`cargo test -p guest`).

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// What the kernel does once it has booted.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Print the hello line, optionally touch memory or fault, power off.
    #[default]
    Demo,
    /// Run the on-target test suite and exit with its verdict.
    Test,
    /// Run the reclaim workloads under each policy and print the summary.
    Reclaim,
    /// Run the hostile-guest suite, then the hypercall fuzzer, and exit
    /// with the verdict (the hypervisor checks its invariants at the exit).
    Hostile,
    /// Run only the hypercall fuzzer (`fuzz_calls=` calls) and exit.
    Fuzz,
}

/// The arguments of `mode=reclaim`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReclaimArgs {
    /// `pages=`: pages in the pageable arena.
    pub pages: u32,
    /// `accesses=`: accesses per run, the populating pass included.
    pub accesses: u64,
    /// `seed=`.
    pub seed: u64,
    /// `target_pct=`: memory target in percent of the arena.
    pub target_pct: u32,
    /// `workloads=`, in order (names are checked by the runner).
    pub workloads: Vec<String>,
    /// `policies=`, in order (names are checked by the runner).
    pub policies: Vec<String>,
}

impl Default for ReclaimArgs {
    fn default() -> Self {
        Self {
            pages: 4096,
            accesses: 200_000,
            seed: 1,
            target_pct: 40,
            workloads: ["idle", "hotcold", "phase", "scan"]
                .map(String::from)
                .to_vec(),
            policies: ["mglru", "fifo", "clock-perpage"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// A deliberate fault the demo can provoke.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Read an IPA that is neither RAM nor a device.
    Outside,
    /// Point the vectors outside RAM and fault: an abort loop the guest
    /// cannot handle (the hypervisor must stop it).
    AbortLoop,
}

/// Log verbosity requested with `log=`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Verbosity {
    /// Info and above (the default).
    #[default]
    Info,
    /// Debug and above.
    Debug,
    /// Everything.
    Trace,
}

/// Default of `stress_ms=`.
pub const DEFAULT_STRESS_MS: u64 = 300;

/// Largest `stress_ms=`: one hour, so that a typo cannot make the suite
/// hang for days.
pub const MAX_STRESS_MS: u64 = 3_600_000;

/// Default of `fuzz_calls=`: the quick mode CI runs.
pub const DEFAULT_FUZZ_CALLS: u64 = 20_000;

/// The parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmdline {
    /// `mode=`.
    pub mode: Mode,
    /// `touch=`, in bytes.
    pub touch_bytes: u64,
    /// `fault=`.
    pub fault: Option<Fault>,
    /// `log=`.
    pub verbosity: Verbosity,
    /// `stress_ms=`: how long the `stress` test writes and verifies memory.
    pub stress_ms: u64,
    /// `mode=reclaim` arguments.
    pub reclaim: ReclaimArgs,
    /// `fuzz_calls=`: hypercalls the fuzzer issues, all vCPUs together.
    pub fuzz_calls: u64,
    /// Words whose key is not known, in order of appearance.
    pub unknown: Vec<String>,
}

impl Default for Cmdline {
    fn default() -> Self {
        Self {
            mode: Mode::default(),
            touch_bytes: 0,
            fault: None,
            verbosity: Verbosity::default(),
            stress_ms: DEFAULT_STRESS_MS,
            reclaim: ReclaimArgs::default(),
            fuzz_calls: DEFAULT_FUZZ_CALLS,
            unknown: Vec::new(),
        }
    }
}

/// A known key with a value it does not accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmdlineError {
    /// `mode=` is neither `demo` nor `test`.
    Mode(String),
    /// `touch=` is not a size.
    Size {
        /// The key.
        key: &'static str,
        /// The offending value.
        value: String,
    },
    /// `fault=` is not `outside`.
    Fault(String),
    /// `log=` is not a known level.
    Verbosity(String),
    /// `stress_ms=` is not a number in `1..=`[`MAX_STRESS_MS`].
    StressMs(String),
    /// A reclaim number out of its range.
    Number {
        /// The key.
        key: &'static str,
        /// The offending value.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mode(v) => write!(
                f,
                "mode={v}: expected `demo`, `test`, `reclaim`, `hostile` or `fuzz`"
            ),
            Self::Number {
                key,
                value,
                expected,
            } => write!(f, "{key}={value}: expected {expected}"),
            Self::Size { key, value } => {
                write!(
                    f,
                    "{key}={value}: expected a size such as 4096, 0x1000, 64K, 64M or 1G"
                )
            }
            Self::Fault(v) => write!(f, "fault={v}: expected `outside` or `abortloop`"),
            Self::Verbosity(v) => write!(f, "log={v}: expected `info`, `debug` or `trace`"),
            Self::StressMs(v) => write!(
                f,
                "stress_ms={v}: expected milliseconds, 1 to {MAX_STRESS_MS} (decimal or 0x hex)"
            ),
        }
    }
}

/// Parses a command line.
pub fn parse(line: &str) -> Result<Cmdline, CmdlineError> {
    let mut cmdline = Cmdline::default();
    for word in line.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            cmdline.unknown.push(word.to_string());
            continue;
        };
        match key {
            "mode" => {
                cmdline.mode = match value {
                    "demo" => Mode::Demo,
                    "test" => Mode::Test,
                    "reclaim" => Mode::Reclaim,
                    "hostile" => Mode::Hostile,
                    "fuzz" => Mode::Fuzz,
                    _ => return Err(CmdlineError::Mode(value.to_string())),
                }
            }
            "touch" => {
                cmdline.touch_bytes = parse_size(value).ok_or_else(|| CmdlineError::Size {
                    key: "touch",
                    value: value.to_string(),
                })?
            }
            "fault" => {
                cmdline.fault = match value {
                    "outside" => Some(Fault::Outside),
                    "abortloop" => Some(Fault::AbortLoop),
                    _ => return Err(CmdlineError::Fault(value.to_string())),
                }
            }
            "log" => {
                cmdline.verbosity = match value {
                    "info" => Verbosity::Info,
                    "debug" => Verbosity::Debug,
                    "trace" => Verbosity::Trace,
                    _ => return Err(CmdlineError::Verbosity(value.to_string())),
                }
            }
            "stress_ms" => {
                cmdline.stress_ms = parse_u64(value)
                    .filter(|ms| (1..=MAX_STRESS_MS).contains(ms))
                    .ok_or_else(|| CmdlineError::StressMs(value.to_string()))?
            }
            "pages" => {
                cmdline.reclaim.pages =
                    number("pages", value, 64, 1 << 18, "pages, 64 to 262144")? as u32
            }
            "accesses" => {
                cmdline.reclaim.accesses = number(
                    "accesses",
                    value,
                    1,
                    u64::MAX,
                    "a number of accesses, at least 1",
                )?
            }
            "seed" => cmdline.reclaim.seed = number("seed", value, 0, u64::MAX, "a number")?,
            "target_pct" => {
                cmdline.reclaim.target_pct =
                    number("target_pct", value, 1, 100, "a percentage, 1 to 100")? as u32
            }
            "fuzz_calls" => {
                cmdline.fuzz_calls = number(
                    "fuzz_calls",
                    value,
                    1,
                    1_000_000_000,
                    "a number of calls, 1 to 1000000000",
                )?
            }
            "workloads" => cmdline.reclaim.workloads = list(value),
            "policies" => cmdline.reclaim.policies = list(value),
            _ => cmdline.unknown.push(key.to_string()),
        }
    }
    Ok(cmdline)
}

/// A number in `min..=max` for `key`.
fn number(
    key: &'static str,
    value: &str,
    min: u64,
    max: u64,
    expected: &'static str,
) -> Result<u64, CmdlineError> {
    parse_u64(value)
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| CmdlineError::Number {
            key,
            value: value.to_string(),
            expected,
        })
}

/// A comma-separated list (empty items dropped).
fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Sizes are written as for the hypervisor's bootargs: `4096`, `0x1000`,
/// `64K`, `64M`, `1G` (one parser for both, in `hyp-core`).
pub use hyp_core::bootargs::parse_size;

/// Numbers are decimal or `0x` hexadecimal, as for the hypervisor.
use hyp_core::bootargs::parse_u64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_and_fuzz_modes() {
        assert_eq!(parse("mode=hostile").unwrap().mode, Mode::Hostile);
        let c = parse("mode=fuzz fuzz_calls=1000000 seed=7").unwrap();
        assert_eq!(
            (c.mode, c.fuzz_calls, c.reclaim.seed),
            (Mode::Fuzz, 1_000_000, 7)
        );
        assert_eq!(parse("").unwrap().fuzz_calls, DEFAULT_FUZZ_CALLS);
        assert!(parse("fuzz_calls=0").is_err());
    }

    #[test]
    fn empty_line_gives_defaults() {
        assert_eq!(parse(""), Ok(Cmdline::default()));
        assert_eq!(parse("   ").unwrap().mode, Mode::Demo);
    }

    #[test]
    fn reclaim_keys() {
        let c = parse("mode=reclaim pages=8192 accesses=1000 seed=7 target_pct=40 workloads=hotcold,scan policies=mglru").unwrap();
        assert_eq!(c.mode, Mode::Reclaim);
        assert_eq!(c.reclaim.pages, 8192);
        assert_eq!(c.reclaim.accesses, 1000);
        assert_eq!(c.reclaim.seed, 7);
        assert_eq!(c.reclaim.workloads, ["hotcold", "scan"]);
        assert_eq!(c.reclaim.policies, ["mglru"]);
        assert!(matches!(
            parse("pages=10"),
            Err(CmdlineError::Number { key: "pages", .. })
        ));
        assert!(matches!(
            parse("target_pct=0"),
            Err(CmdlineError::Number { .. })
        ));
        assert!(matches!(
            parse("target_pct=101"),
            Err(CmdlineError::Number { .. })
        ));
        assert_eq!(parse("").unwrap().reclaim, ReclaimArgs::default());
    }

    #[test]
    fn all_keys() {
        let c = parse("mode=test touch=64M fault=outside log=debug stress_ms=2000").unwrap();
        assert_eq!(c.mode, Mode::Test);
        assert_eq!(c.stress_ms, 2000);
        assert_eq!(c.touch_bytes, 64 << 20);
        assert_eq!(c.fault, Some(Fault::Outside));
        assert_eq!(c.verbosity, Verbosity::Debug);
        assert!(c.unknown.is_empty());
    }

    #[test]
    fn unknown_keys_are_collected_by_name() {
        let c = parse("console=ttyAMA0 mode=demo quiet foo=bar=baz").unwrap();
        assert_eq!(c.unknown, ["console", "quiet", "foo"]);
        assert_eq!(c.mode, Mode::Demo);
    }

    #[test]
    fn stress_ms() {
        assert_eq!(parse("").unwrap().stress_ms, DEFAULT_STRESS_MS);
        assert_eq!(DEFAULT_STRESS_MS, 300);
        assert_eq!(parse("stress_ms=1").unwrap().stress_ms, 1);
        assert_eq!(parse("stress_ms=0x100").unwrap().stress_ms, 256);
        assert_eq!(parse("stress_ms=3600000").unwrap().stress_ms, MAX_STRESS_MS);
        for bad in ["0", "3600001", "", "-5", "2s", "0x", "99999999999999999999"] {
            assert_eq!(
                parse(&format!("mode=test stress_ms={bad}")),
                Err(CmdlineError::StressMs(bad.into())),
                "stress_ms={bad}"
            );
        }
        assert!(parse("stress_ms=0")
            .unwrap_err()
            .to_string()
            .starts_with("stress_ms=0: expected milliseconds"));
    }

    #[test]
    fn last_value_wins() {
        assert_eq!(parse("mode=test mode=demo").unwrap().mode, Mode::Demo);
    }

    #[test]
    fn bad_values_are_errors() {
        assert_eq!(parse("mode=fast"), Err(CmdlineError::Mode("fast".into())));
        assert_eq!(
            parse("fault=inside"),
            Err(CmdlineError::Fault("inside".into()))
        );
        assert_eq!(
            parse("log=loud"),
            Err(CmdlineError::Verbosity("loud".into()))
        );
        assert!(matches!(
            parse("touch=lots"),
            Err(CmdlineError::Size { key: "touch", .. })
        ));
        assert!(matches!(parse("touch="), Err(CmdlineError::Size { .. })));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("8k"), Some(8192));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("0x10M"), Some(16 << 20));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("1T"), None);
        assert_eq!(parse_size("17179869184G"), None);
    }
}
