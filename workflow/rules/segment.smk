rule segment:
    input:
        slide=slide_path("{slide_id}"),
        tissue="results/{cancer_type}/{slide_id}/tissue.parquet",
        weights=model_weights(),
    output:
        "results/{cancer_type}/{slide_id}/nuclei.parquet",
    params:
        mpp=lambda wc: mpp_flags(wc.slide_id),
        flags=cfg_flags(config["segment"]),
        config_hash=config_hash("mpp_work", "segment", "model"),
    threads: config["segment"].get("workers", 0) + 1
    resources:
        mem_mb=lambda wc, attempt: 3000 * attempt,
        gpu=config["gpus_per_job"],
    retries: 1
    log:
        "logs/segment/{cancer_type}/{slide_id}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress segment {input.slide} --out {output} --checkpoint {input.weights} "
        "--tissue-mask {input.tissue} --slide-id {wildcards.slide_id} "
        "--config-hash {params.config_hash} {params.mpp} {params.flags} > {log} 2>&1"
