use std::collections::HashMap;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::TractErrorContext;
fn main() -> TractResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = tract_onnx::onnx().model_for_path(&args[0])?.into_typed()?;
    let symbol = model.symbols.get(chardiff_runtime::tract::BATCH_SYMBOL).context("no batch")?;
    let model = model.set_symbols(&HashMap::from([(symbol, 1.to_dim())]))?;
    let model = chardiff_runtime::tract::cpu_forms(model)?;
    let model = model.into_compact()?;
    for n in model.nodes() {
        if n.name.contains(&args[1]) || args[1] == "all" {
            let inputs: Vec<String> = n
                .inputs
                .iter()
                .map(|i| format!("{}/{}", model.node(i.node).name, i.slot))
                .collect();
            println!(
                "{} [{}] {:?} <- {:?}  {:?}",
                n.id,
                n.op.name(),
                n.op.info().unwrap_or_default(),
                inputs,
                n.outputs[0].fact
            );
        }
    }
    Ok(())
}
