//! `ps`.

use anyhow::Result;
use migrun_runtime::{processes, StateRoot};

use crate::cli::TableOrJson;

/// `migrun ps [-f table|json] ID [ps options]`.
pub fn ps(root: &StateRoot, id: &str, format: TableOrJson, ps_args: &[String]) -> Result<i32> {
    match format {
        TableOrJson::Json => println!("{}", serde_json::to_string(&processes::pids(root, id)?)?),
        TableOrJson::Table => print!("{}", processes::table(root, id, ps_args)?),
    }
    Ok(0)
}
