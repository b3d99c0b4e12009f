//! The compressed page store (skeleton; being written).
#![cfg_attr(not(test), no_std)]
