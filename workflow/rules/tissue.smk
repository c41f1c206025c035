rule tissue:
    input:
        slide=slide_path("{slide_id}"),
    output:
        polygons="results/{cancer_type}/{slide_id}/tissue.parquet",
        # Not a report item: the report shows a sample of slides' overlays (qc.smk), not thousands.
        preview="results/{cancer_type}/{slide_id}/tissue.png",
        tiles="results/{cancer_type}/{slide_id}/tiles.parquet",
        patches="results/{cancer_type}/{slide_id}/patches.npz",
        facts="results/{cancer_type}/{slide_id}/wsi.json",
    params:
        mpp=lambda wc: mpp_flags(wc.slide_id),
        flags=cfg_flags(config["tissue"]),
        mpp_work=config["mpp_work"],
    log:
        "logs/tissue/{cancer_type}/{slide_id}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress tissue {input.slide} --out-dir $(dirname {output.facts}) "
        "--slide-id {wildcards.slide_id} --mpp-work {params.mpp_work} {params.mpp} {params.flags} "
        "> {log} 2>&1"
