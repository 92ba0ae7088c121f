//! The scripted receiver of the tests. It lives in the engine crate as
//! `caduceus_engine::sink`, where `caduceus demo` and the benchmarks use it
//! too, so tests, demo and benchmarks share one receiver.

pub use caduceus_engine::sink::{
    CommandRecord, DomainScript, MessageSummary, Plan, Received, Recording, Response, Script,
    ScriptedReceiver, SinkSummary, TlsCounts,
};
