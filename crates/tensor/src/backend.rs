//! The backend trait.
