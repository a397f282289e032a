//! STUB (issue 3).
