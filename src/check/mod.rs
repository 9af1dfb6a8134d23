//! Checkers of what a cluster did, for tests and fault-injection runs: whether a recorded
//! history of client operations could have happened on a correct system.

pub mod linearizability;
