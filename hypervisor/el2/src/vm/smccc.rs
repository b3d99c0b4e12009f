//! The SMCCC dispatcher for guest HVCs: the SMCCC architecture calls, PSCI
//! 1.1, and our vendor hypervisor service (hyp-abi). Every argument is
//! checked; a bad call gets an SMCCC/PSCI error code and a log line.

use super::exits::Next;
use super::guest_warn;
use super::vendor;
use super::{PowerState, VcpuEnd, Vm};
use crate::exceptions::GuestContext;
use core::sync::atomic::Ordering;
use hyp_abi::{error, feature, func, psci as psci_ids, HYP_UID, REVISION};
use log::info;
use smccc::arch::{SMCCC_ARCH_FEATURES, SMCCC_VERSION};
use smccc::psci::error as psci_err;

/// Function ID bit 30: the SMC64/HVC64 calling convention.
const SMC64_BIT: u32 = 1 << 30;
/// PSCI version 1.1, as PSCI_VERSION returns it.
const PSCI_VERSION_1_1: u64 = 0x0001_0001;
/// SMCCC version 1.1.
const SMCCC_VERSION_1_1: u64 = 0x0001_0001;
/// AFFINITY_INFO answers.
const AFF_ON: u64 = 0;
const AFF_OFF: u64 = 1;
const AFF_ON_PENDING: u64 = 2;

/// The PSCI functions implemented (for PSCI_FEATURES).
const PSCI_IMPLEMENTED: [u32; 9] = [
    psci_ids::PSCI_VERSION,
    psci_ids::PSCI_FEATURES,
    psci_ids::PSCI_CPU_ON_64,
    psci_ids::PSCI_CPU_OFF,
    psci_ids::PSCI_AFFINITY_INFO_64,
    psci_ids::PSCI_SYSTEM_OFF,
    psci_ids::PSCI_SYSTEM_RESET,
    psci_ids::PSCI_CPU_ON_32,
    psci_ids::PSCI_AFFINITY_INFO_32,
];

fn psci_code(code: i32) -> u64 {
    i64::from(code) as u64
}

/// Handles an HVC exit (ELR already points past the HVC).
pub(super) fn handle_hvc(vm: &Vm, index: usize, ctx: &mut GuestContext) -> Next {
    let fid = ctx.x[0] as u32;
    if let Some(call) = vendor::Call::from_fid(fid) {
        let answer = vendor::handle(vm, index, call, [ctx.x[1], ctx.x[2], ctx.x[3], ctx.x[4]]);
        ctx.x[..4].copy_from_slice(&answer);
        return Next::Resume;
    }
    // SMC32/HVC32 calls (bit 30 clear) pass 32-bit arguments: the upper
    // halves of the registers are ignored, as SMCCC requires.
    let mut args = [ctx.x[1], ctx.x[2], ctx.x[3]];
    if fid & SMC64_BIT == 0 {
        args = args.map(|a| a & u64::from(u32::MAX));
    }
    let mut ret = [ctx.x[0], ctx.x[1], ctx.x[2], ctx.x[3]];
    let mut set = |r: &[u64]| ret[..r.len()].copy_from_slice(r);
    match fid {
        SMCCC_VERSION => set(&[SMCCC_VERSION_1_1]),
        // Mandatory from SMCCC 1.1: only the two discovery calls exist.
        SMCCC_ARCH_FEATURES => set(&[match args[0] as u32 {
            SMCCC_VERSION | SMCCC_ARCH_FEATURES => 0,
            _ => error::NOT_SUPPORTED as u64,
        }]),
        psci_ids::PSCI_VERSION => set(&[PSCI_VERSION_1_1]),
        psci_ids::PSCI_FEATURES => {
            let q = args[0] as u32;
            let ok = PSCI_IMPLEMENTED.contains(&q) || q == SMCCC_VERSION;
            set(&[if ok {
                0
            } else {
                psci_code(psci_err::NOT_SUPPORTED)
            }]);
        }
        psci_ids::PSCI_CPU_ON_64 | psci_ids::PSCI_CPU_ON_32 => set(&[cpu_on(vm, index, args)]),
        psci_ids::PSCI_AFFINITY_INFO_64 | psci_ids::PSCI_AFFINITY_INFO_32 => {
            set(&[affinity_info(vm, args[0], args[1])])
        }
        psci_ids::PSCI_CPU_OFF => {
            vm.vcpus[index]
                .state
                .store(PowerState::Off as u8, Ordering::Release);
            return Next::Stop(VcpuEnd::Off);
        }
        psci_ids::PSCI_SYSTEM_OFF => {
            info!("vm0/vcpu{index}: PSCI SYSTEM_OFF");
            vm.end(index, 0, None)
        }
        psci_ids::PSCI_SYSTEM_RESET => {
            info!("vm0/vcpu{index}: PSCI SYSTEM_RESET: VM reset is not supported, powering off");
            vm.end(index, 0, None)
        }
        func::CALL_UID => set(&HYP_UID.map(u64::from)),
        func::REVISION => set(&[u64::from(REVISION.0), u64::from(REVISION.1)]),
        func::FEATURES => set(&[
            if vm.store.is_some() {
                feature::ALL
            } else {
                feature::ALL & !feature::STORE
            },
            vm.regs.af as u64,
        ]),
        func::EXIT => match u8::try_from(args[0]) {
            Ok(code) => {
                info!("vm0/vcpu{index}: EXIT({code})");
                vm.end(index, code, None)
            }
            Err(_) => {
                guest_warn!(
                    Call,
                    "vm0/vcpu{index}: EXIT({:#x}): code out of range 0..=255",
                    args[0]
                );
                set(&[error::INVALID_PARAMETER as u64]);
            }
        },
        _ => {
            guest_warn!(
                Call,
                "vm0/vcpu{index}: unknown hypercall {fid:#010x}: NOT_SUPPORTED"
            );
            set(&[error::NOT_SUPPORTED as u64]);
        }
    }
    ctx.x[..4].copy_from_slice(&ret);
    Next::Resume
}

/// Index of the vCPU whose MPIDR affinity is `mpidr`.
fn find_vcpu(vm: &Vm, mpidr: u64) -> Option<usize> {
    const AFF_MASK: u64 = 0xff_00ff_ffff;
    vm.vcpus
        .iter()
        .position(|v| v.mpidr & AFF_MASK == mpidr & AFF_MASK)
}

/// PSCI CPU_ON(target, entry, context_id).
fn cpu_on(vm: &Vm, index: usize, [target, entry, context_id]: [u64; 3]) -> u64 {
    let Some(t) = find_vcpu(vm, target) else {
        guest_warn!(
            Call,
            "vm0/vcpu{index}: CPU_ON for unknown MPIDR {target:#x}"
        );
        return psci_code(psci_err::INVALID_PARAMETERS);
    };
    if !vm.in_ram(hyp_core::addr::Ipa(entry)) || entry % 4 != 0 {
        guest_warn!(
            Call,
            "vm0/vcpu{index}: CPU_ON vcpu{t} with entry {entry:#x} outside RAM or unaligned"
        );
        return psci_code(psci_err::INVALID_ADDRESS);
    }
    let vcpu = &vm.vcpus[t];
    match vcpu.state.compare_exchange(
        PowerState::Off as u8,
        PowerState::Claimed as u8,
        Ordering::Acquire,
        Ordering::Acquire,
    ) {
        Ok(_) => {
            vcpu.entry.store(entry, Ordering::Relaxed);
            vcpu.context_id.store(context_id, Ordering::Relaxed);
            // Publishes entry and context id to the target's idle loop.
            vcpu.state
                .store(PowerState::Pending as u8, Ordering::Release);
            aarch64_cpu::asm::sev();
            0
        }
        Err(s) => match PowerState::from_u8(s) {
            PowerState::On => psci_code(psci_err::ALREADY_ON),
            _ => psci_code(psci_err::ON_PENDING),
        },
    }
}

/// PSCI AFFINITY_INFO(target, lowest level): only level 0 exists.
fn affinity_info(vm: &Vm, target: u64, level: u64) -> u64 {
    if level != 0 {
        return psci_code(psci_err::INVALID_PARAMETERS);
    }
    match find_vcpu(vm, target) {
        None => psci_code(psci_err::INVALID_PARAMETERS),
        Some(t) => match PowerState::from_u8(vm.vcpus[t].state.load(Ordering::Acquire)) {
            PowerState::On => AFF_ON,
            PowerState::Off => AFF_OFF,
            PowerState::Claimed | PowerState::Pending => AFF_ON_PENDING,
        },
    }
}
