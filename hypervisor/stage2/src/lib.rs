//! Stage-2 page tables (placeholder: filled in by the stage-2 work).
#![no_std]
