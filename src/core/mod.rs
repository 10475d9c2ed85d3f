pub mod detokenizer;
pub mod sampling;
