//! fhir-bulk-proxy: a reverse proxy that adds FHIR Bulk Data `$export` to a FHIR server lacking it.

pub mod admin;
pub mod api;
pub mod auth;
pub mod config;
pub mod export;
pub mod fhir_types;
pub mod files;
pub mod http;
pub mod metrics;
pub mod outcome;
pub mod proxy;
pub mod route;
pub mod server;
pub mod storage;
pub mod store;
pub mod telemetry;
pub mod upstream;
