//! The guest-side reclaimer (skeleton; being written).
#![cfg_attr(not(test), no_std)]
