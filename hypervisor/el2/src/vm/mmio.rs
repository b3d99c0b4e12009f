//! Decoding of data-abort syndromes and the emulated PL011.
//!
//! The guest's console is a PL011 that the hypervisor emulates: bytes
//! written to UARTDR are collected per vCPU and printed as whole lines
//! tagged `vm0/vcpuN`, so guest output never interleaves with the
//! hypervisor's or another vCPU's.

use alloc::vec::Vec;
use tock_registers::register_bitfields;

register_bitfields! {u64,
    /// ISS of a data abort (ESR_ELx.EC = 0x24/0x25).
    pub DABT_ISS [
        /// Instruction syndrome valid (SAS/SSE/SRT/SF/AR are meaningful).
        ISV OFFSET(24) NUMBITS(1) [],
        /// Access size: 0 byte, 1 halfword, 2 word, 3 doubleword.
        SAS OFFSET(22) NUMBITS(2) [],
        /// Syndrome sign extend.
        SSE OFFSET(21) NUMBITS(1) [],
        /// The transfer register Xt.
        SRT OFFSET(16) NUMBITS(5) [],
        /// 64-bit register transfer.
        SF OFFSET(15) NUMBITS(1) [],
        /// FAR not valid.
        FNV OFFSET(10) NUMBITS(1) [],
        /// Stage-2 fault on a stage-1 table walk.
        S1PTW OFFSET(7) NUMBITS(1) [],
        /// Write not read.
        WNR OFFSET(6) NUMBITS(1) [],
        /// Data fault status code.
        DFSC OFFSET(0) NUMBITS(6) []
    ]
}

/// What a fault status code (DFSC/IFSC) says happened.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FaultStatus {
    /// Translation fault at a level: nothing mapped.
    Translation(u8),
    /// Access-flag fault at a level: mapped with AF clear.
    AccessFlag(u8),
    /// Permission fault at a level.
    Permission(u8),
    /// Anything else (external abort, alignment, ...), raw code.
    Other(u64),
}

impl FaultStatus {
    /// Decodes a 6-bit DFSC/IFSC.
    pub fn decode(code: u64) -> Self {
        let level = (code & 0b11) as u8;
        match code & !0b11 {
            0b00_0100 => Self::Translation(level),
            0b00_1000 => Self::AccessFlag(level),
            0b00_1100 => Self::Permission(level),
            _ => Self::Other(code),
        }
    }
}

/// UARTDR, the only PL011 register whose writes do something.
const UARTDR: u64 = 0x000;
/// Longest line kept before it is printed anyway (marked as continued).
const MAX_LINE: usize = hyp_abi::layout::UART_MAX_LINE;

/// One vCPU's console line buffer.
#[derive(Debug, Default)]
pub struct ConsoleLine {
    buf: Vec<u8>,
}

impl ConsoleLine {
    /// Handles a guest write of `value` at `offset` in the UART page.
    pub fn write(&mut self, vcpu: usize, offset: u64, value: u64) {
        if offset != UARTDR {
            return;
        }
        match value as u8 {
            b'\n' => self.flush(vcpu, false),
            b'\r' => {}
            byte => {
                self.buf.push(byte);
                if self.buf.len() >= MAX_LINE {
                    self.flush(vcpu, true);
                }
            }
        }
    }

    /// What every guest read of the UART returns: zero, so UARTFR (0x018)
    /// says the transmit FIFO is never full and other registers read as 0.
    pub const READ_VALUE: u64 = 0;

    /// Prints what is buffered (a partial line at VM exit, say).
    pub fn flush(&mut self, vcpu: usize, continued: bool) {
        if self.buf.is_empty() && continued {
            return;
        }
        // Lossy, not all-or-nothing: a piece split inside a multi-byte
        // character (or a stray byte) keeps every other character.
        let text = alloc::string::String::from_utf8_lossy(&self.buf);
        let mark = if continued { " \\" } else { "" };
        crate::println!("vm0/vcpu{vcpu}: {text}{mark}");
        self.buf.clear();
    }

    /// Whether a partial line is pending.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}
