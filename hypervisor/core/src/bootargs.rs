//! The hypervisor command line (`/chosen/bootargs`, QEMU `-append`).
//!
//! Space-separated `key=value` options (a bare `key` means `key=`). Parsing
//! never fails as a whole: an unknown option or a malformed value is
//! reported as a [`BootargError`] naming it, and the default is kept.
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `log=off\|error\|warn\|info\|debug\|trace` | console log level | `info` |
//! | `guest=ADDR+SIZE` | guest image loaded by QEMU's generic loader | none (no VM) |
//! | `guest_mem=SIZE` | guest RAM size (`K`/`M`/`G` suffixes, hex ok) | `256M` |
//! | `guest_cpus=N` | vCPUs (0 = one per physical CPU) | `0` |
//! | `af=auto\|hw\|sw` | stage-2 Access Flag: hardware if present, forced hardware, forced software | `auto` |
//! | `fault=el2\|panic\|s2alias` | test only: trigger an EL2 data abort or a panic after boot, or map one guest frame at two IPAs (for the invariant checker) | none |
//! | `aging_cpu=N` | physical CPU that runs the background aging worker instead of a vCPU (range-checked against the CPU count at boot) | none (no worker) |
//! | `store=SIZE` | most host memory the compressed page store may use (`K`/`M`/`G`, a multiple of 4K; 0 = no store) | `64M` |
//! | `migrate=N` | migration stress: guest pages the aging worker moves to new frames per pass, `0..=4096` (0 = off) | `0` |
//! | `invariants=off\|final\|exit` | when the hypervisor checks its memory invariants (stage 2 against the frame allocator): never, when the VM stops, or also at every guest exit (slow: debug runs) | `final` |
//! | `overcommit=on\|off` | allow guest RAM larger than the free host memory: frames are only backed on demand, and the VM is stopped with an out-of-memory report when none is left | `off` |
//! | `guest.KEY=VALUE` | passed to the guest's own `/chosen/bootargs` as `KEY=VALUE` | |

use crate::addr::{PhysAddr, PhysRange};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use log::LevelFilter;

/// A deliberately triggered failure, to test the fatal paths.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FaultInjection {
    /// A data abort taken at EL2 (access to an unmapped address).
    El2DataAbort,
    /// A Rust panic.
    Panic,
    /// Stage 2 maps one guest frame at a second IPA (a double mapping the
    /// invariant checker must report: exit status 106).
    S2Alias,
}

/// Who maintains the stage-2 Access Flag.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AfPolicy {
    /// Hardware AF when `ID_AA64MMFR1_EL1.HAFDBS >= 1`, else software.
    Auto,
    /// Hardware AF; falls back to software (with a warning) if absent.
    Hardware,
    /// Software AF through Access-flag faults even if hardware could do it.
    Software,
}

/// When the invariant checker runs (`invariants=`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum InvariantChecks {
    /// Never.
    Off,
    /// When the VM stops (EXIT, SYSTEM_OFF), after a final TLB flush.
    Final,
    /// Also after every guest exit (expensive: for debug runs).
    EveryExit,
}

/// The typed hypervisor configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootConfig {
    /// Console log level.
    pub log_level: LevelFilter,
    /// Where QEMU's loader put the guest image, if any.
    pub guest_image: Option<PhysRange>,
    /// Guest RAM size in bytes.
    pub guest_mem: u64,
    /// Number of vCPUs; 0 means one per physical CPU.
    pub guest_cpus: u32,
    /// Access Flag policy.
    pub af: AfPolicy,
    /// Test-only fault injection.
    pub fault: Option<FaultInjection>,
    /// Physical CPU index that runs the background aging worker instead
    /// of a vCPU; `None`: no worker. Only parsed here: whether the CPU
    /// exists is checked where the CPU count is known.
    pub aging_cpu: Option<u32>,
    /// Migration stress: how many random guest pages the aging worker
    /// moves to new frames per pass (0 = off, at most [`MAX_MIGRATE`]).
    pub migrate: u32,
    /// Bytes of host memory the compressed page store may use (whole
    /// frames; 0 disables the store).
    pub store_size: u64,
    /// When the memory invariants are checked.
    pub invariants: InvariantChecks,
    /// Whether guest RAM may exceed the free host memory.
    pub overcommit: bool,
    /// The guest's command line, assembled from `guest.KEY=VALUE` options.
    pub guest_bootargs: String,
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            log_level: LevelFilter::Info,
            guest_image: None,
            guest_mem: 256 << 20,
            guest_cpus: 0,
            af: AfPolicy::Auto,
            fault: None,
            aging_cpu: None,
            migrate: 0,
            store_size: 64 << 20,
            invariants: InvariantChecks::Final,
            overcommit: false,
            guest_bootargs: String::new(),
        }
    }
}

/// Largest `migrate=` value: pages moved per aging pass.
pub const MAX_MIGRATE: u32 = 4096;

/// A problem with one option; the option is ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootargError {
    /// The key is not known.
    Unknown {
        /// The option as written.
        key: String,
    },
    /// The key is known but its value is not valid.
    Malformed {
        /// The option's key.
        key: String,
        /// The value as written.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
}

impl fmt::Display for BootargError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown { key } => write!(f, "bootargs: unknown option `{key}` ignored"),
            Self::Malformed {
                key,
                value,
                expected,
            } => write!(
                f,
                "bootargs: bad value `{value}` for `{key}` (expected {expected}), ignored"
            ),
        }
    }
}

/// Parses a number: decimal, or hex with `0x`; no suffix.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None => s.parse().ok(),
    }
}

/// Parses a size: a number with an optional `K`, `M` or `G` suffix
/// (binary units), rejecting overflow.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n = parse_u64(digits)?;
    n.checked_mul(1u64 << shift)
}

fn parse_range(s: &str) -> Option<PhysRange> {
    let (start, size) = s.split_once('+')?;
    let start = parse_u64(start)?;
    let size = parse_size(size)?;
    if size == 0 || start.checked_add(size).is_none() {
        return None;
    }
    Some(PhysRange::new(PhysAddr(start), size))
}

fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

impl BootConfig {
    /// Parses a command line. Returns the configuration and every problem
    /// found, in order; problems never stop the parse.
    pub fn parse(cmdline: &str) -> (Self, Vec<BootargError>) {
        let mut cfg = Self::default();
        let mut errors = Vec::new();
        let mut guest_args: Vec<&str> = Vec::new();
        for token in cmdline.split_ascii_whitespace() {
            let (key, value) = token.split_once('=').unwrap_or((token, ""));
            let bad = |expected| BootargError::Malformed {
                key: key.into(),
                value: value.into(),
                expected,
            };
            let result = match key {
                "log" => parse_level(value)
                    .map(|l| cfg.log_level = l)
                    .ok_or_else(|| bad("off|error|warn|info|debug|trace")),
                "guest" => parse_range(value)
                    .map(|r| cfg.guest_image = Some(r))
                    .ok_or_else(|| bad("ADDR+SIZE, non-empty, no overflow")),
                "guest_mem" => parse_size(value)
                    .filter(|&s| s > 0 && s % (2 << 20) == 0)
                    .map(|s| cfg.guest_mem = s)
                    .ok_or_else(|| bad("a non-zero multiple of 2M")),
                "guest_cpus" => value
                    .parse::<u32>()
                    .ok()
                    .filter(|&n| n <= 64)
                    .map(|n| cfg.guest_cpus = n)
                    .ok_or_else(|| bad("0..=64")),
                "af" => match value {
                    "auto" => Some(AfPolicy::Auto),
                    "hw" => Some(AfPolicy::Hardware),
                    "sw" => Some(AfPolicy::Software),
                    _ => None,
                }
                .map(|p| cfg.af = p)
                .ok_or_else(|| bad("auto|hw|sw")),
                "fault" => match value {
                    "el2" => Some(FaultInjection::El2DataAbort),
                    "panic" => Some(FaultInjection::Panic),
                    "s2alias" => Some(FaultInjection::S2Alias),
                    _ => None,
                }
                .map(|f| cfg.fault = Some(f))
                .ok_or_else(|| bad("el2|panic|s2alias")),
                "aging_cpu" => parse_u64(value)
                    .and_then(|n| u32::try_from(n).ok())
                    .map(|n| cfg.aging_cpu = Some(n))
                    .ok_or_else(|| bad("a CPU index (u32)")),
                "migrate" => parse_u64(value)
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|&n| n <= MAX_MIGRATE)
                    .map(|n| cfg.migrate = n)
                    .ok_or_else(|| bad("pages per pass, 0..=4096")),
                "store" => parse_size(value)
                    .filter(|&s| s % 4096 == 0)
                    .map(|s| cfg.store_size = s)
                    .ok_or_else(|| bad("a multiple of 4K (0 = no store)")),
                "invariants" => match value {
                    "off" => Some(InvariantChecks::Off),
                    "final" => Some(InvariantChecks::Final),
                    "exit" => Some(InvariantChecks::EveryExit),
                    _ => None,
                }
                .map(|c| cfg.invariants = c)
                .ok_or_else(|| bad("off|final|exit")),
                "overcommit" => match value {
                    "on" => Some(true),
                    "off" => Some(false),
                    _ => None,
                }
                .map(|o| cfg.overcommit = o)
                .ok_or_else(|| bad("on|off")),
                _ => match key.strip_prefix("guest.") {
                    Some(k) if !k.is_empty() => {
                        guest_args.push(&token["guest.".len()..]);
                        Ok(())
                    }
                    _ => Err(BootargError::Unknown { key: key.into() }),
                },
            };
            if let Err(e) = result {
                errors.push(e);
            }
        }
        cfg.guest_bootargs = guest_args.join(" ");
        (cfg, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::string::ToString;

    #[test]
    fn defaults_when_empty() {
        let (cfg, errs) = BootConfig::parse("");
        assert_eq!(cfg, BootConfig::default());
        assert!(errs.is_empty());
    }

    #[test]
    fn every_option() {
        let (cfg, errs) = BootConfig::parse(
            "log=debug guest=0x48000000+0x20000 guest_mem=1G guest_cpus=2 af=sw fault=el2 \
             aging_cpu=3 migrate=64 guest.mode=test guest.touch=64M",
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(cfg.log_level, LevelFilter::Debug);
        assert_eq!(
            cfg.guest_image,
            Some(PhysRange::new(PhysAddr(0x4800_0000), 0x20000))
        );
        assert_eq!(cfg.guest_mem, 1 << 30);
        assert_eq!(cfg.guest_cpus, 2);
        assert_eq!(cfg.af, AfPolicy::Software);
        assert_eq!(cfg.fault, Some(FaultInjection::El2DataAbort));
        assert_eq!(cfg.aging_cpu, Some(3));
        assert_eq!(cfg.migrate, 64);
        assert_eq!(cfg.store_size, 64 << 20, "the default");
        assert_eq!(cfg.guest_bootargs, "mode=test touch=64M");
        assert_eq!(cfg.invariants, InvariantChecks::Final, "the default");
        assert!(!cfg.overcommit, "the default");
        let (cfg, errs) = BootConfig::parse("invariants=exit overcommit=on invariants=sometimes");
        assert_eq!(cfg.invariants, InvariantChecks::EveryExit);
        assert!(cfg.overcommit);
        assert_eq!(errs.len(), 1, "invariants=sometimes is not a mode");
        let (cfg, errs) = BootConfig::parse("store=2M store=5");
        assert_eq!(cfg.store_size, 2 << 20);
        assert_eq!(errs.len(), 1, "store=5 is not a multiple of 4K");
    }

    #[test]
    fn unknown_and_malformed_are_named_and_ignored() {
        let (cfg, errs) = BootConfig::parse("bogus log=loud guest_mem=3M guest=0x1000+0 af");
        assert_eq!(cfg.log_level, LevelFilter::Info);
        assert_eq!(cfg.guest_mem, 256 << 20);
        assert_eq!(cfg.guest_image, None);
        let msgs: Vec<_> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 5, "{msgs:?}");
        assert!(msgs[0].contains("unknown option `bogus`"));
        assert!(msgs[1].contains("`loud` for `log`"));
        assert!(msgs[2].contains("`guest_mem`"));
        assert!(msgs[3].contains("`guest`"));
        assert!(msgs[4].contains("`af`"));
    }

    #[test]
    fn aging_cpu_and_migrate_values() {
        let (cfg, errs) = BootConfig::parse("aging_cpu=0 migrate=0");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(cfg.aging_cpu, Some(0), "CPU 0 is a valid index, not `none`");
        assert_eq!(cfg.migrate, 0);
        let (cfg, errs) = BootConfig::parse("aging_cpu=0x7 migrate=4096");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(cfg.aging_cpu, Some(7));
        assert_eq!(cfg.migrate, MAX_MIGRATE);
        // Last value wins, as for the other options.
        let (cfg, _) = BootConfig::parse("migrate=8 migrate=16");
        assert_eq!(cfg.migrate, 16);
    }

    #[test]
    fn bad_aging_cpu_and_migrate_are_named_and_ignored() {
        let (cfg, errs) = BootConfig::parse(
            "aging_cpu= aging_cpu=-1 aging_cpu=two aging_cpu=4294967296 \
             migrate=4097 migrate=-1 migrate=lots migrate=0x",
        );
        assert_eq!(cfg.aging_cpu, None, "default kept");
        assert_eq!(cfg.migrate, 0, "default kept");
        assert_eq!(errs.len(), 8, "{errs:?}");
        for (e, (key, value)) in errs.iter().zip([
            ("aging_cpu", ""),
            ("aging_cpu", "-1"),
            ("aging_cpu", "two"),
            ("aging_cpu", "4294967296"),
            ("migrate", "4097"),
            ("migrate", "-1"),
            ("migrate", "lots"),
            ("migrate", "0x"),
        ]) {
            assert!(
                matches!(e, BootargError::Malformed { key: k, value: v, .. } if k == key && v == value),
                "{e:?} for {key}={value}"
            );
            assert!(
                e.to_string()
                    .contains(&std::format!("`{value}` for `{key}`")),
                "{e}"
            );
        }
        // A bad value does not reset a good one given earlier.
        let (cfg, errs) = BootConfig::parse("aging_cpu=2 migrate=100 aging_cpu=x migrate=5000");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(cfg.aging_cpu, Some(2));
        assert_eq!(cfg.migrate, 100);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("0x1000"), Some(0x1000));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("0x"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
        assert_eq!(parse_size("17179869184G"), None, "overflow rejected");
    }

    proptest! {
        /// Whatever the input, parsing terminates without panicking and
        /// every token that is not a valid option yields exactly one error.
        #[test]
        fn never_panics(s in "[ -~]{0,80}") {
            let (_, errs) = BootConfig::parse(&s);
            prop_assert!(errs.len() <= s.split_ascii_whitespace().count());
        }
    }
}
