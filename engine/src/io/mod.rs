//! File I/O that needs `unsafe`, kept in one place with its safety
//! arguments.

pub mod mapping;
