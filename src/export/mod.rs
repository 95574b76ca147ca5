//! The bulk export path: kick-off → job in store → planner → workers → NDJSON writer → manifest.

pub mod compartment;
pub mod elements;
pub mod failure;
pub mod filters;
pub mod kickoff;
pub mod manifest;
pub mod planner;
pub mod ranges;
pub mod references;
pub mod runner;
pub mod worker;
pub mod writer;
