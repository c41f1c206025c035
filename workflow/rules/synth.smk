def texture_dir_args():
    dirs = config["synth"].get("texture_dirs") or []
    return ["--texture-dir", *(f"{d['path']}:{d['mpp']}" for d in dirs)] if dirs else []


rule synth:
    input:
        patches=lambda wc: per_slide("results/{cancer_type}/{slide_id}/patches.npz", wc.cancer_type),
    output:
        shards=directory("results/synth/{cancer_type}/shards"),
        sheet=report(
            "results/synth/{cancer_type}/contact_sheet.png",
            category="Synthetic data",
            labels={"cancer type": "{cancer_type}"},
        ),
    params:
        # The sheet names the inputs: a cohort's paths would overflow the command line.
        samples=lambda wc: config["cohorts"][wc.cancer_type],
        args=cfg_args({**config["synth"]["params"], "mpp": config["mpp_work"]}),
        texture_dirs=texture_dir_args(),
    threads: config["synth"].get("threads", 2)
    log:
        "logs/synth/{cancer_type}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress synth --sheet {params.samples:q} {params.texture_dirs:q} "
        "--out-dir {output.shards:q} --contact-sheet {output.sheet:q} --workers={threads} {params.args:q} "
        "> {log:q} 2>&1"


def refiner_config():
    """The synth.refiner section (the schema fills in defaults; .get keeps unvalidated configs working)."""
    return config["synth"].get("refiner") or {}


def synth_shards(cancer_type):
    """The training data of a cancer type: the refined shards when the GAN refiner is on, else the synthetic ones."""
    kind = "refined" if refiner_config().get("enabled", False) else "shards"
    return f"results/synth/{cancer_type}/{kind}"


rule refine:
    input:
        shards="results/synth/{cancer_type}/shards",
        patches=lambda wc: per_slide("results/{cancer_type}/{slide_id}/patches.npz", wc.cancer_type),
    output:
        refined=directory("results/synth/{cancer_type}/refined"),
        weights="results/synth/{cancer_type}/refiner.pt",
        sheet=report(
            "results/synth/{cancer_type}/contact_sheet_refined.png",
            category="Synthetic data",
            labels={"cancer type": "{cancer_type}", "figure": "synthetic / refined / real"},
        ),
    params:
        samples=lambda wc: config["cohorts"][wc.cancer_type],
        args=cfg_args({**(refiner_config().get("params") or {}), "mpp": config["mpp_work"]}),
        texture_dirs=texture_dir_args(),
    threads: refiner_config().get("threads", 2)
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        gpu=config.get("gpus_per_job", 0),  # the refiner trains on CUDA (mixed precision) when it sees one
    log:
        "logs/refine/{cancer_type}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress refine --synth {input.shards:q} --sheet {params.samples:q} {params.texture_dirs:q} "
        "--out-dir {output.refined:q} --weights {output.weights:q} --contact-sheet {output.sheet:q} "
        "--num-threads={threads} {params.args:q} > {log:q} 2>&1"
