rule qc:
    input:
        facts="results/{cancer_type}/{slide_id}/wsi.json",
        nuclei="results/{cancer_type}/{slide_id}/nuclei.parquet",
        tiles="results/{cancer_type}/{slide_id}/tiles.parquet",
        tissue="results/{cancer_type}/{slide_id}/tissue.parquet",
        slide=slide_path("{slide_id}"),
        weights=model_weights(),  # the model-based signals (TTA disagreement, entropy) run the network
    output:
        row="results/{cancer_type}/{slide_id}/qc.json",
        patches="results/{cancer_type}/{slide_id}/qc_patches.parquet",
        overlay="results/{cancer_type}/{slide_id}/qc_overlay.png",
    params:
        source=lambda wc: SLIDE_ROWS[wc.slide_id]["source"],
        flags=cfg_flags(config["qc"]),
        config_hash=config_hash("mpp_work", "segment", "model", "qc"),
        backend=config["slide_backend"],
    log:
        "logs/qc/{cancer_type}/{slide_id}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress qc --wsi {input.facts} --nuclei {input.nuclei} --tiles {input.tiles} "
        "--slide {input.slide} --out-json {output.row} --out-patches {output.patches} "
        "--checkpoint {input.weights} --tissue {input.tissue} --out-overlay {output.overlay} "
        "--cancer-type {wildcards.cancer_type} --source '{params.source}' --backend {params.backend} "
        "--config-hash {params.config_hash} {params.flags} > {log} 2>&1"


rule qc_cohort:
    """Per cancer type: the QC table, and the type's partition of the hive-partitioned nuclei dataset."""
    wildcard_constraints:
        cancer_type=r"(?!slides\.parquet$)[A-Za-z0-9_-]+",  # results/qc/slides.parquet is qc_all's
    input:
        rows=lambda wc: per_slide("results/{cancer_type}/{slide_id}/qc.json", wc.cancer_type),
        nuclei=lambda wc: per_slide("results/{cancer_type}/{slide_id}/nuclei.parquet", wc.cancer_type),
    output:
        table="results/qc/{cancer_type}.parquet",
        nuclei=directory("results/nuclei/cancer_type={cancer_type}"),
    params:
        config_hash=config_hash("mpp_work", "segment", "model", "qc"),
    log:
        "logs/qc/{cancer_type}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "(nucseg --no-progress aggregate {input.rows} --out {output.table} --config-hash {params.config_hash} && "
        "nucseg --no-progress publish {input.nuclei} --dataset results/nuclei --cancer-type {wildcards.cancer_type}) "
        "> {log} 2>&1"


rule qc_all:
    input:
        expand("results/qc/{cancer_type}.parquet", cancer_type=SELECTED),
    output:
        table="results/qc/slides.parquet",
        grades=report("results/qc/grades.tsv", category="Quality control"),
    params:
        config_hash=config_hash("mpp_work", "segment", "model", "qc"),
    log:
        "logs/qc/all.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress aggregate {input} --out {output.table} --summary {output.grades} "
        "--config-hash {params.config_hash} > {log} 2>&1"


# Figures for `snakemake --report`: one rule per figure set, all drawn from the QC tables.
rule report_grades:
    input:
        "results/qc/slides.parquet",
    output:
        report(
            "results/report/grades.html",
            category="Quality control",
            subcategory="Grades",
            labels={"figure": "grade table per cancer type"},
        ),
    log:
        "logs/report/grades.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress report-figures grades --slides {input} --out {output} > {log} 2>&1"


rule report_histograms:
    input:
        "results/qc/slides.parquet",
    output:
        pct=report(
            "results/report/pct_bad_patches.png",
            category="Quality control",
            subcategory="Distributions",
            labels={"figure": "% bad patches per slide"},
        ),
        density=report(
            "results/report/nuclei_density.png",
            category="Quality control",
            subcategory="Distributions",
            labels={"figure": "nuclei per mm² of tissue"},
        ),
    log:
        "logs/report/histograms.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress report-figures histograms --slides {input} --out $(dirname {output.pct}) "
        "> {log} 2>&1"


rule report_thumbnails:
    """Every Unacceptable slide and a sample of the others: thumbnail, tissue, nuclei, checked patches."""
    input:
        slides="results/qc/slides.parquet",
        overlays=lambda wc: [p for t in SELECTED for p in per_slide("results/{cancer_type}/{slide_id}/qc_overlay.png", t)],
    output:
        report(
            directory("results/report/thumbnails"),
            patterns=["{grade}/{cancer_type}/{slide_id}.png"],
            category="Slides",
            subcategory="{grade}",
            labels={"slide": "{slide_id}", "cancer type": "{cancer_type}", "grade": "{grade}"},
        ),
    params:
        n=config.get("report", {}).get("n_thumbnails", 12),
    log:
        "logs/report/thumbnails.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress report-figures thumbnails --slides {input.slides} "
        "--overlay-pattern 'results/{{cancer_type}}/{{slide_id}}/qc_overlay.png' "
        "--out {output} --n-thumbnails {params.n} > {log} 2>&1"
