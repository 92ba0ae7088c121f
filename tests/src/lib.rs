//! Support code for the end-to-end tests: real peers and the scripted receiver.
