//! Hub downloads.
