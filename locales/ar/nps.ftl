nps-ask = ما مدى احتمال أن توصي صديقًا بـ Example Shop؟ 0 = إطلاقًا، 10 = بالتأكيد.
nps-promoter = شكرًا لك، هذا يعني لنا الكثير! هل تترك تقييمًا قصيرًا أو تشارك المتجر مع صديق؟
nps-btn-review = اكتب تقييمًا
nps-btn-refer = ادعُ صديقًا
nps-refer = أرسل هذا الرابط إلى صديق، وستحصلان كلاكما على محاولة إضافية في عجلة الجوائز: https://t.me/ExampleShopBot?start={ $referral_ref }
nps-passive = شكرًا! ما الشيء الواحد الذي يجب أن نحسّنه؟
nps-thanks = شكرًا لك، نحن نقرأ كل إجابة.
nps-detractor = يؤسفنا سماع ذلك. ما الذي حدث؟
nps-p-delivery = التوصيل
nps-p-product = المنتج
nps-p-support = خدمة العملاء
nps-p-other = شيء آخر
nps-detail = أخبرنا من فضلك بكلمات قليلة بما حدث.
nps-0 = 0
nps-1 = 1
nps-2 = 2
nps-3 = 3
nps-4 = 4
nps-5 = 5
nps-6 = 6
nps-7 = 7
nps-8 = 8
nps-9 = 9
nps-10 = 10
