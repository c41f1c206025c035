# Exports of the nuclei: per slide, from its nuclei.parquet. `export: {qupath: true}` adds them to `rule all`;
# `snakemake export_qupath` builds them for every slide of the built cancer types.
rule qupath_geojson:
    """QuPath GeoJSON (detections with measurements), for File > Import objects or drag and drop."""
    input:
        "results/{cancer_type}/{slide_id}/nuclei.parquet",
    output:
        "results/export/qupath/{cancer_type}/{slide_id}.geojson",
    log:
        "logs/export/qupath/{cancer_type}/{slide_id}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress export {input:q} --format qupath --out {output:q} > {log:q} 2>&1"


rule export_qupath:
    input:
        export_targets(),
