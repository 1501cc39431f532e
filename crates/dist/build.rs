fn main() {
    glatrain_build::link_libtorch();
}
