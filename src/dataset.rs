//! Which data a run uses, as the user names it on the command line.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Result, bail};
use loren_nn::data::{SplitOptions, Splits, bundled_digits, load_digits, split_digits};

/// A dataset: `digits` (the bundled 8×8 digits) or `digits:PATH` (the same format from a file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    Digits(Option<PathBuf>),
}

impl FromStr for DataSource {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "digits" => Ok(DataSource::Digits(None)),
            Some(("digits", path)) if !path.is_empty() => {
                Ok(DataSource::Digits(Some(PathBuf::from(path))))
            }
            _ => bail!(
                "unknown dataset '{s}': expected digits or digits:PATH (a gzipped CSV like the bundled one)"
            ),
        }
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Digits(None) => f.write_str("digits"),
            DataSource::Digits(Some(p)) => write!(f, "digits:{}", p.display()),
        }
    }
}

impl DataSource {
    /// Load and split: the fixed, seeded pretrain / train / validation / test split.
    pub fn splits(&self, holdout_classes: &[u32]) -> Result<Splits> {
        let all = match self {
            DataSource::Digits(None) => bundled_digits()?,
            DataSource::Digits(Some(path)) => load_digits(path)?,
        };
        let opts = SplitOptions {
            holdout_classes: holdout_classes.to_vec(),
            ..SplitOptions::default()
        };
        Ok(split_digits(&all, &opts)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_sources() {
        for s in ["digits", "digits:/tmp/x.csv.gz"] {
            assert_eq!(s.parse::<DataSource>().unwrap().to_string(), s);
        }
        for bad in ["", "digits:", "cifar", "mnist:/x"] {
            let e = bad.parse::<DataSource>().unwrap_err().to_string();
            assert!(e.contains("unknown dataset"), "{e}");
        }
    }
}
