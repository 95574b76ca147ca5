//! The bulk export path: kick-off → job in store → planner → workers → NDJSON writer → manifest.

pub mod associated;
pub mod compartment;
pub mod elements;
pub mod failure;
pub mod filters;
pub mod kickoff;
pub mod layout;
pub mod limits;
pub mod manifest;
pub mod model;
pub mod organize;
pub mod output;
pub mod page;
pub mod planner;
pub mod prefetch;
pub mod ranges;
pub mod references;
pub mod runner;
pub mod whole;
pub mod window;
pub mod worker;
pub mod writer;
