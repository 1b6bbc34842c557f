//! fga-wb: a write-behind layer for OpenFGA.
#![warn(missing_docs)]

pub mod config;
mod error;
mod model;
pub mod openfga;
pub mod tuple;

pub use config::Config;
pub use error::{Error, Result};
pub use tuple::{Op, TupleKey};
