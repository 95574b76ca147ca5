//! fhir-bulk-proxy: a reverse proxy that adds FHIR Bulk Data `$export` to a FHIR server lacking it.
//!
//! A map for reading the code, in the order a request meets it. The binary (`src/main.rs`) parses the
//! command line into a [`config`] and hands it to [`server`], which opens the job [`store`], resumes
//! unfinished jobs and serves until SIGTERM. Every request is then routed once, by [`route`], onto one of
//! two paths.
//!
//! # Pass-through
//!
//! Everything the proxy does not own goes to the upstream and back, streamed and unchanged but for the
//! base URL. [`server`] accepts connections and spreads them over one single-threaded runtime per core
//! (`server/threads`); [`api`] sends the request to [`proxy`], which forwards it on an upstream
//! connection of that client connection's own ([`proxy::affinity`]). With
//! `pass_through = "require-token"`, [`auth::access`] checks the token's scopes first.
//!
//! # Export
//!
//! kick-off → job → slices → pages → NDJSON files → manifest, all under [`export`]:
//!
//! - [`export::kickoff`] validates the request into an export spec, with [`export::filters`] for
//!   `_typeFilter` and [`fhir_types`] for type names; [`api`] makes it a job and the runner stores it
//!   ([`store`], persistence only). The domain types (`Level`, `ExportSpec`, `Job`, `Slice`) are in
//!   [`export::model`]; which types each level exports, and how each is reached, is
//!   [`export::compartment::level_types`]; the `_lastUpdated` window (`_since`, the client's bound,
//!   `transactionTime`) is [`export::window`].
//! - [`export::runner`] admits and drives jobs; [`export::planner`] turns a job into slices (upstream
//!   searches), by type, by [`export::ranges`] of `_lastUpdated`, by patient batch through
//!   [`export::compartment`], and later by [`export::references`] and [`export::associated`]
//!   (`includeAssociatedData`). Which slices a job has, how their lines go into files and which
//!   manifest items those files become is the output layout, [`export::layout`].
//! - [`export::worker`] runs one slice as a small state machine: it pages through it with [`upstream`]
//!   (rate-limited, retried; [`upstream::bundle`] reads each page as it arrives, [`export::prefetch`]
//!   asks for the next one early), converts each page into lines ([`export::page`],
//!   [`export::elements`]) and appends them through [`export::output`] and [`export::writer`] in the
//!   crash-safety order, within the job's [`export::limits`]. Why a job failed is a
//!   [`export::failure::JobFailure`], turned into a status and OperationOutcome next to `ApiError` in
//!   [`http`].
//! - [`export::manifest`] answers status polls; finished files live in [`storage`] (data directory
//!   or S3) and are served by [`files`].
//!
//! # Around both paths
//!
//! [`cohort`] is the Bulk Cohort API: criteria-based Groups created through the proxy, their members
//! computed over the upstream and kept in the [`store`], exported through the Group path above.
//!
//! [`auth`] is SMART Backend Services (token endpoint, [`auth::clients`], [`auth::scopes`],
//! [`auth::replay`]); [`admin`] is the operators' listener with [`metrics`]; [`telemetry`] sets up logs
//! and traces; [`outcome`] builds OperationOutcomes and [`http`] turns every error into one.
//!
//! `docs/architecture.md` tells the same story with the crash-safety contract and a table of every
//! file; `cargo doc --open` renders this page with the links.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cohort;
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
